"""The scheduler on its own: its order (by tokens, or round-robin), bounds, timeouts,
cancellation."""

from __future__ import annotations

import asyncio

import pytest

from llamaserve.errors import RateLimited, ServiceUnavailable
from llamaserve.gateway.scheduling import EngineState, Grant, QueueLimits, Scheduler


async def run_requests(scheduler: Scheduler, plan: list[str], served: list[str]) -> None:
    """Each entry of `plan` is a user's request, queued in that order; each holds its slot
    until every earlier one was served."""
    release = {tag: asyncio.Event() for tag in plan}

    async def request(tag: str) -> None:
        grant = await scheduler.acquire(tag[0])
        served.append(tag)
        await release[tag].wait()
        scheduler.release(tag[0], grant.engine)

    tasks = []
    for tag in plan:
        tasks.append(asyncio.create_task(request(tag)))
        await asyncio.sleep(0)  # queued in plan order
    while len(served) < len(plan):
        await asyncio.sleep(0)
        release[served[-1]].set()
    await asyncio.gather(*tasks)


def test_users_are_served_round_robin_not_first_come() -> None:
    scheduler = Scheduler([EngineState("e", capacity=1)], QueueLimits())
    served: list[str] = []
    plan = ["a1", "a2", "a3", "a4", "a5", "b1", "c1"]
    asyncio.run(run_requests(scheduler, plan, served))
    # b and c wait only for the request generating when they came, not for a's backlog.
    assert served == ["a1", "b1", "c1", "a2", "a3", "a4", "a5"]


def test_round_robin_across_several_backlogs() -> None:
    scheduler = Scheduler([EngineState("e", capacity=1)], QueueLimits())
    served: list[str] = []
    asyncio.run(run_requests(scheduler, ["a1", "a2", "a3", "b1", "b2", "c1"], served))
    # Never served first, then whoever was served least recently: a, b, a, b...
    assert served == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_slots_of_all_engines_are_used_most_free_first() -> None:
    async def scenario() -> list[int]:
        small, big = EngineState("small", capacity=1), EngineState("big", capacity=3)
        scheduler = Scheduler([small, big], QueueLimits())
        grants = [await scheduler.acquire(f"u{i}") for i in range(4)]
        assert {g.engine.url for g in grants} == {"small", "big"}
        return [small.in_flight, big.in_flight]

    assert asyncio.run(scenario()) == [1, 3]


def test_per_user_concurrency_limit_lets_others_pass() -> None:
    async def scenario() -> list[str]:
        scheduler = Scheduler([EngineState("e", capacity=2)], QueueLimits(per_user=1))
        await scheduler.acquire("a")
        waiting_a = asyncio.create_task(scheduler.acquire("a"))
        await asyncio.sleep(0)
        grant_b = await asyncio.wait_for(scheduler.acquire("b"), 1)  # b is not held back
        assert not waiting_a.done()
        waiting_a.cancel()
        return [grant_b.engine.url]

    assert asyncio.run(scenario()) == ["e"]


def test_user_queue_bound_is_429_and_total_bound_503() -> None:
    async def scenario() -> None:
        scheduler = Scheduler(
            [EngineState("e", capacity=1)], QueueLimits(queue_size=3, user_queue_size=2)
        )
        await scheduler.acquire("a")
        waiting = [asyncio.create_task(scheduler.acquire("a")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(RateLimited) as user_full:
            await scheduler.acquire("a")
        assert user_full.value.code == "user_queue_full" and user_full.value.headers
        waiting.append(asyncio.create_task(scheduler.acquire("b")))
        await asyncio.sleep(0)
        with pytest.raises(ServiceUnavailable) as server_full:
            await scheduler.acquire("c")
        assert server_full.value.code == "queue_full" and server_full.value.headers
        for task in waiting:
            task.cancel()

    asyncio.run(scenario())


def test_waiting_longer_than_the_limit_is_503() -> None:
    async def scenario() -> None:
        scheduler = Scheduler([EngineState("e", capacity=1)], QueueLimits(max_wait=0.05))
        await scheduler.acquire("a")
        with pytest.raises(ServiceUnavailable) as timed_out:
            await scheduler.acquire("b")
        assert timed_out.value.code == "queue_timeout"
        assert scheduler.waiting == 0

    asyncio.run(scenario())


def test_a_request_cancelled_while_queued_leaves_the_queue() -> None:
    async def scenario() -> str:
        engine = EngineState("e", capacity=1)
        scheduler = Scheduler([engine], QueueLimits())
        await scheduler.acquire("a")
        gone = asyncio.create_task(scheduler.acquire("b"))
        stays = asyncio.create_task(scheduler.acquire("c"))
        await asyncio.sleep(0)
        gone.cancel()  # b's client went away
        await asyncio.gather(gone, return_exceptions=True)
        assert scheduler.waiting == 1
        scheduler.release("a", engine)
        grant = await asyncio.wait_for(stays, 1)  # the slot goes to c, not to b's ghost
        assert engine.in_flight == 1
        return grant.engine.url

    assert asyncio.run(scenario()) == "e"


def test_a_request_cancelled_as_its_slot_is_granted_gives_the_slot_back() -> None:
    """The cancel and the grant in one turn of the loop: the request still ends cancelled
    and its slot is free. (Python 3.11's asyncio.wait_for returned the slot instead,
    swallowing the cancel: a refused request then held it for good.)"""

    async def scenario() -> None:
        engine = EngineState("e", capacity=1)
        scheduler = Scheduler([engine], QueueLimits())
        first = await scheduler.acquire("a")
        waiting = asyncio.create_task(scheduler.acquire("b"))
        await asyncio.sleep(0)  # b is queued
        scheduler.release("a", first.engine)  # grants b the slot...
        waiting.cancel()  # ...as b's request is refused
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert engine.in_flight == 0 and scheduler.waiting == 0

    asyncio.run(scenario())


def test_no_healthy_engine_is_503_at_once() -> None:
    async def scenario() -> None:
        scheduler = Scheduler([EngineState("e", healthy=False)], QueueLimits())
        with pytest.raises(ServiceUnavailable):
            await scheduler.acquire("a")

    asyncio.run(scenario())


def test_a_reserved_slot_lets_a_newcomer_start_at_once() -> None:
    async def scenario() -> tuple[int, bool]:
        engine = EngineState("e", capacity=4)
        scheduler = Scheduler([engine], QueueLimits(reserved=1))
        heavy = [asyncio.create_task(scheduler.acquire("heavy")) for _ in range(10)]
        await asyncio.sleep(0)
        generating = engine.in_flight  # the heavy user alone leaves one slot free
        light = await asyncio.wait_for(scheduler.acquire("light"), 1)
        for task in heavy:
            task.cancel()
        return generating, light.waited < 0.5

    assert asyncio.run(scenario()) == (3, True)


def test_the_fewest_generating_are_served_first() -> None:
    async def scenario() -> list[str]:
        engine = EngineState("e", capacity=3)
        scheduler = Scheduler([engine], QueueLimits(reserved=0))
        for _ in range(3):
            await scheduler.acquire("a")  # a fills the engine
        order: list[str] = []

        async def wait(user: str) -> None:
            await scheduler.acquire(user)
            order.append(user)

        tasks = [asyncio.create_task(wait(u)) for u in ("a", "b")]
        await asyncio.sleep(0)
        scheduler.release("a", engine)  # one slot frees: b (nothing generating) gets it
        for _ in range(10):  # the grant reaches b's task in a few turns of the loop
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        return order

    assert asyncio.run(scenario()) == ["b"]


def test_no_reserve_on_an_engine_too_small_for_one() -> None:
    async def scenario() -> int:
        engine = EngineState("e", capacity=1)
        scheduler = Scheduler([engine], QueueLimits(reserved=1))
        await asyncio.wait_for(scheduler.acquire("a"), 1)
        return engine.in_flight

    assert asyncio.run(scenario()) == 1


def test_looking_at_the_queue_while_no_slot_is_free_costs_no_one_their_turn() -> None:
    async def scenario() -> str:
        engine = EngineState("e", capacity=1)
        scheduler = Scheduler([engine], QueueLimits())
        await scheduler.acquire("a")  # a generates
        waiting = [asyncio.create_task(scheduler.acquire(u)) for u in ("b", "a")]
        await asyncio.sleep(0)  # queued: b, then a
        waiting.append(asyncio.create_task(scheduler.acquire("a")))  # looks, finds no slot
        await asyncio.sleep(0)
        scheduler.release("a", engine)
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        served = waiting.index(done.pop())
        for task in waiting:
            task.cancel()
        return ["b", "a", "a"][served]

    assert asyncio.run(scenario()) == "b"


# Fairness by tokens (the default): the next slot goes to the user served the fewest.


async def serve_one_by_one(
    scheduler: Scheduler, holder: tuple[str, int], backlog: dict[str, list[int]], count: int
) -> list[str]:
    """Each user's requests (their tokens), queued at once while `holder` (a user, and
    the tokens they were charged) has the one slot of the engine; the order of the first
    `count` served, each released at once."""
    order: list[str] = []

    async def request(user: str, cost: int) -> None:
        grant = await scheduler.acquire(user, cost=cost)
        order.append(user)
        await asyncio.sleep(0)
        scheduler.release(user, grant.engine, grant.charged)

    tasks = [asyncio.create_task(request(u, c)) for u, costs in backlog.items() for c in costs]
    await asyncio.sleep(0)  # all queued
    scheduler.release(holder[0], scheduler.engines[0], holder[1])
    while len(order) < count:
        await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return order[:count]


def test_a_heavy_user_is_served_as_many_tokens_as_a_light_one_not_as_many_requests() -> None:
    async def scenario(fairness: str) -> list[str]:
        engine = EngineState("e", capacity=1)
        scheduler = Scheduler([engine], QueueLimits(fairness=fairness))  # type: ignore[arg-type]
        await scheduler.acquire("z")
        backlog = {"heavy": [1000] * 10, "light": [100] * 50}
        return await serve_one_by_one(scheduler, ("z", 0), backlog, 33)

    by_tokens = asyncio.run(scenario("tokens"))
    # Ten light requests for each heavy one: their tokens never more than one heavy
    # request apart.
    assert by_tokens.count("heavy") == 3 and by_tokens.count("light") == 30
    heavy = light = 0
    for user in by_tokens:
        heavy, light = heavy + (user == "heavy") * 1000, light + (user == "light") * 100
        assert abs(heavy - light) <= 1000
    by_requests = asyncio.run(scenario("requests"))  # the round-robin of old
    assert by_requests[:6] == ["heavy", "light"] * 3


def test_an_estimate_corrected_by_the_exact_count_moves_the_counter() -> None:
    async def scenario() -> list[str]:
        engine = EngineState("e", capacity=2)
        scheduler = Scheduler([engine], QueueLimits())
        await scheduler.acquire("b", cost=500)
        first = await scheduler.acquire("a", cost=1000)  # estimated at 1000...
        waiting = [asyncio.create_task(scheduler.acquire(u, cost=100)) for u in ("b", "a")]
        await asyncio.sleep(0)
        scheduler.served("a", 10 - first.charged)  # ...it was 10: a (10) before b (500)
        scheduler.release("a", engine, first.charged)
        done, _ = await asyncio.wait(waiting, timeout=1, return_when=asyncio.FIRST_COMPLETED)
        served = ["b" if task is waiting[0] else "a" for task in done]
        for task in waiting:
            task.cancel()
        return served

    assert asyncio.run(scenario()) == ["a"]


def test_a_newcomer_is_lifted_to_the_least_counter_and_banks_no_idle_time() -> None:
    async def scenario() -> list[str]:
        engine = EngineState("e", capacity=1)
        scheduler = Scheduler([engine], QueueLimits())
        await scheduler.acquire("a", cost=100)
        for _ in range(10):  # a alone, for a while, never idle: 1100 tokens
            task = asyncio.create_task(scheduler.acquire("a", cost=100))
            await asyncio.sleep(0)
            scheduler.release("a", engine, 100)
            await task
        # b comes, and a still has a backlog: b starts from a's 1000 (what a's request
        # generating will cost is not known yet), not from 0, so it does not get ten
        # requests in a row.
        backlog = {"a": [100] * 6, "b": [100] * 6}
        return await serve_one_by_one(scheduler, ("a", 100), backlog, 8)

    assert "".join(asyncio.run(scenario())) == "babababa"


def test_a_user_in_debt_waits_until_the_others_catch_up() -> None:
    async def scenario() -> list[str]:
        engine = EngineState("e", capacity=2)
        scheduler = Scheduler([engine], QueueLimits())
        light = await scheduler.acquire("light", cost=100)
        heavy = await scheduler.acquire("heavy", cost=1000)
        scheduler.release("heavy", heavy.engine, 1000)  # heavy is idle, but owes 1000 tokens
        await scheduler.acquire("light", cost=100)  # light at 200; the engine is full
        waiting = [asyncio.create_task(scheduler.acquire(u, cost=400)) for u in ("heavy", "light")]
        await asyncio.sleep(0)  # heavy came first, yet light (200) goes before it (1000)
        scheduler.release("light", light.engine, 100)
        done, _ = await asyncio.wait(waiting, timeout=1, return_when=asyncio.FIRST_COMPLETED)
        served = ["heavy" if task is waiting[0] else "light" for task in done]
        for task in waiting:
            task.cancel()
        return served

    assert asyncio.run(scenario()) == ["light"]


def test_the_least_served_user_at_their_cap_lets_the_next_one_pass() -> None:
    async def scenario() -> list[str]:
        engine = EngineState("e", capacity=2)
        scheduler = Scheduler([engine], QueueLimits(per_user=1))
        cheap = await scheduler.acquire("cheap", cost=0)  # cheap: 0 tokens, at its cap
        dear = await scheduler.acquire("dear", cost=1000)
        waiting = [asyncio.create_task(scheduler.acquire(u, cost=10)) for u in ("cheap", "dear")]
        await asyncio.sleep(0)
        # cheap has the least counter, but is at its cap
        scheduler.release("dear", dear.engine, dear.charged)
        done, _ = await asyncio.wait(waiting, timeout=1, return_when=asyncio.FIRST_COMPLETED)
        served = ["cheap" if task is waiting[0] else "dear" for task in done]
        scheduler.release("cheap", cheap.engine)
        await asyncio.wait_for(waiting[0], 1)  # then cheap's turn, once under its cap
        return served

    assert asyncio.run(scenario()) == ["dear"]


def test_a_light_user_takes_the_next_free_slot_from_a_heavy_backlog_at_16_slots() -> None:
    """The benchmark's fairness scenario in miniature: a heavy user keeps twice the 16 slots
    busy with requests of mixed lengths (charged an estimate, then corrected to less); a
    light user sends one request at a time. Each light request gets the very next slot
    that frees, before any of the heavy user's waiting ones."""

    async def scenario() -> list[str]:
        engine = EngineState("e", capacity=16)
        scheduler = Scheduler([engine], QueueLimits())
        heavy: list[tuple[asyncio.Task[Grant], int]] = []  # (its slot, exact tokens)
        lengths = [64, 160, 96, 192, 128]

        def send_heavy() -> None:
            task = asyncio.create_task(scheduler.acquire("heavy", cost=30 + 200))
            heavy.append((task, 20 + lengths[len(heavy) % 5]))

        def end(user: str, grant: Grant, exact: int) -> None:
            scheduler.served(user, exact - grant.charged)
            scheduler.release(user, grant.engine, grant.charged)

        for _ in range(32):
            send_heavy()
        await asyncio.sleep(0)
        next_after_light = []
        for _ in range(8):
            light = asyncio.create_task(scheduler.acquire("light", cost=30 + 128))
            await asyncio.sleep(0)
            assert scheduler.per_user()["light"] == (1, 0)  # waiting: every slot is taken
            for n in range(3):  # heavy requests end one by one, their clients send more
                oldest = next(h for h in heavy if h[0].done() and h[1] >= 0)
                heavy[heavy.index(oldest)] = (oldest[0], -1)  # ended
                end("heavy", oldest[0].result(), oldest[1])
                if n == 0:  # who had the slot that freed
                    generating = scheduler.per_user()["light"][1]
                    next_after_light.append("light" if generating else "heavy")
                send_heavy()
                for _ in range(5):
                    await asyncio.sleep(0)
            end(
                "light", await asyncio.wait_for(light, 1), 20 + 128
            )  # then it ends, and the light user pauses
        for task, _ in heavy:
            task.cancel()
        await asyncio.gather(*(t for t, _ in heavy), return_exceptions=True)
        return next_after_light

    assert asyncio.run(scenario()) == ["light"] * 8
