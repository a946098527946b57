"""Room in llama-server's KV pool (`engine/room.py`): what a request holds, and the order
in which waiting requests get room. The real engine with a small pool:
tests/engine/test_sizing.py."""

from __future__ import annotations

import asyncio

import pytest

from llamaserve.engine.room import TEMPLATE_TOKENS, Room


def test_a_request_needs_its_bodys_bytes_and_its_bound_within_its_context() -> None:
    room = Room(pool=8192, per_request=1024)
    assert room.need(100, 200) == 100 + TEMPLATE_TOKENS + 200
    assert room.need(100, None) == 1024  # no max_tokens: it may fill its context
    assert room.need(5000, 10) == 1024


async def holding(room: Room, need: int, log: list[str], name: str, until: asyncio.Event) -> None:
    async with room.held(need):
        log.append(name)
        await until.wait()


def test_requests_wait_for_room_in_order_of_arrival(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        room = Room(pool=1000, per_request=1000)
        log: list[str] = []
        ends = {name: asyncio.Event() for name in "abcd"}
        tasks = {}
        for name, need in (("a", 600), ("b", 600), ("c", 100), ("d", 300)):
            tasks[name] = asyncio.create_task(holding(room, need, log, name, ends[name]))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        # c would fit beside a, but b came first: nobody passes a request that waits.
        assert log == ["a"] and room.used == 600
        # The engine's log says when the line forms and when it is gone, not per request.
        assert caplog.messages == [
            "the KV pool is full (600 of 1000 tokens held): requests wait for room "
            "(LLAMA_KV_POOL sets its size)"
        ]
        ends["a"].set()
        await asyncio.sleep(0.01)
        assert log == ["a", "b", "c", "d"] and room.used == 1000
        assert caplog.messages[1].startswith("the KV pool has room again: 3 requests waited")
        for name in "bcd":
            ends[name].set()
        await asyncio.gather(*tasks.values())
        assert room.used == 0

    asyncio.run(scenario())


def test_a_request_that_goes_away_while_waiting_lets_the_next_in() -> None:
    async def scenario() -> None:
        room = Room(pool=1000, per_request=1000)
        log: list[str] = []
        ends = {name: asyncio.Event() for name in "abc"}
        a = asyncio.create_task(holding(room, 500, log, "a", ends["a"]))
        await asyncio.sleep(0)
        b = asyncio.create_task(holding(room, 1000, log, "b", ends["b"]))
        await asyncio.sleep(0)
        c = asyncio.create_task(holding(room, 400, log, "c", ends["c"]))
        await asyncio.sleep(0.01)
        assert log == ["a"]
        b.cancel()  # its client went away: c, behind it, now fits
        with pytest.raises(asyncio.CancelledError):
            await b
        await asyncio.sleep(0.01)
        assert log == ["a", "c"] and room.used == 900
        ends["a"].set()
        ends["c"].set()
        await asyncio.gather(a, c)
        assert room.used == 0

    asyncio.run(scenario())


def test_room_granted_to_a_request_cancelled_at_that_moment_is_given_back() -> None:
    async def scenario() -> None:
        room = Room(pool=100, per_request=100)
        first = asyncio.Event()
        a = asyncio.create_task(holding(room, 100, [], "a", first))
        await asyncio.sleep(0)
        b = asyncio.create_task(holding(room, 100, [], "b", asyncio.Event()))
        await asyncio.sleep(0.01)
        first.set()
        await a  # b is granted its room, and cancelled before it runs
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert room.used == 0

    asyncio.run(scenario())
