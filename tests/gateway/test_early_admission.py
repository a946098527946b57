"""A request the gateway expects to be admitted goes to the engine while the database
decides. Nothing of the engine's answer reaches a client that is refused, the refusal
comes at once and cancels the engine's work, and one gateway never sends the engine a
request the database then refuses. Through a real gateway and database, with the mock
engine, which records what it was asked and what it finished (it is the subject)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.gateway.harness import Site
from tests.gateway.helpers import MockEngine, assert_envelope, extra_gateway, post
from tests.gateway.helpers import mock_request as body


def chat(url: str, key: str, payload: dict[str, object]) -> httpx.Response:
    return post(url, key, json.dumps(payload))


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def tag(response: httpx.Response) -> str:
    return str(json.loads(response.request.content)["messages"][0]["content"])


@pytest.fixture
def mock_engine() -> Iterator[MockEngine]:
    with MockEngine(slots=16) as mock:  # more than any test sends at once
        yield mock


@pytest.fixture
def engine(site: Site) -> MockEngine:
    return site.engine


@pytest.fixture
def gateway(site: Site) -> Iterator[str]:
    with extra_gateway(site) as url:
        yield url


def test_one_gateway_sends_the_engine_only_admitted_requests(
    site: Site, engine: MockEngine, gateway: str
) -> None:
    name = "early-exact"
    key = site.create_user(name, "--rate-limit", "10", "--window", "600")
    assert chat(gateway, key, body("first")).status_code == 200  # 9 tokens left, it knows

    async def burst() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*(
                client.post(f"{gateway}/v1/chat/completions", json=body(f"b{i}", 0.2),
                            headers=headers)
                for i in range(30)
            )))  # fmt: skip

    async def scenario() -> list[httpx.Response]:
        conn = await site.connect()
        try:
            async with conn.transaction():  # the database answers no admission meanwhile
                await conn.execute(
                    "SELECT 1 FROM rate_limit_state "
                    "WHERE user_id = (SELECT id FROM users WHERE username = $1) FOR UPDATE",
                    name,
                )
                responses = asyncio.create_task(burst())
                # The nine it expects to pass go ahead; the others wait for the database.
                await until(lambda: len(engine.arrivals) >= 10)
                await asyncio.sleep(0.3)  # time for any other to arrive: none may
            return await responses
        finally:
            await conn.close()

    responses = asyncio.run(scenario())
    assert Counter(r.status_code for r in responses) == {200: 9, 429: 21}
    admitted = [tag(r) for r in responses if r.status_code == 200]
    # Exactly the admitted requests reached the engine: none went ahead and was refused.
    assert Counter(engine.arrivals) == Counter(["first", *admitted])
    assert engine.abandoned == []


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
def test_tokens_taken_meanwhile_refuse_at_once_and_cancel_the_engine(
    site: Site, engine: MockEngine, gateway: str, stream: bool
) -> None:
    name = f"early-taken-{'stream' if stream else 'chat'}"
    key = site.create_user(name, "--rate-limit", "5", "--window", "600")
    assert chat(gateway, key, body("first")).status_code == 200  # 4 tokens left, it knows

    async def scenario() -> httpx.Response:
        conn = await site.connect()
        try:
            async with conn.transaction():
                # Another gateway takes the user's last tokens; the row stays locked until
                # the request is at the engine, so its admission waits for this.
                await conn.execute(
                    "UPDATE rate_limit_state SET tat = now() + interval '600 seconds' "
                    "WHERE user_id = (SELECT id FROM users WHERE username = $1)",
                    name,
                )
                request = asyncio.create_task(asyncio.to_thread(
                    chat, gateway, key, body("late", delay=30, stream=stream)))  # fmt: skip
                await until(lambda: "late" in engine.arrivals)
            return await asyncio.wait_for(request, 10)  # not the 30 s of the generation
        finally:
            await conn.close()

    refused = asyncio.run(scenario())
    error = assert_envelope(refused, 429)
    assert error["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["retry-after"]) >= 1
    asyncio.run(until(lambda: "late" in engine.abandoned))
    assert "late" not in engine.finished
    row = site.row(refused.headers["x-request-id"])
    assert (row["status"], row["outcome"], row["username"]) == (429, "rejected", name)


def test_a_key_revoked_meanwhile_gets_nothing_from_the_engine(
    site: Site, engine: MockEngine, gateway: str
) -> None:
    key = site.create_user("early-revoked")
    assert chat(gateway, key, body("first")).status_code == 200  # the gateway knows the key
    key_id = key.split("_")[1]
    assert site.cli("revoke-key", "--key-id", key_id).returncode == 0

    refused = chat(gateway, key, body("after", delay=30))

    assert assert_envelope(refused, 401)["code"] == "key_revoked"
    # It may have reached the engine before the database answered: then it was cancelled.
    time.sleep(0.5)
    assert ("after" in engine.arrivals) == ("after" in engine.abandoned)
    assert "after" not in engine.finished


def test_a_metered_users_request_goes_ahead_of_its_reservation(
    site: Site, engine: MockEngine, gateway: str
) -> None:
    """A user with a token quota and a tokens-per-minute limit, both far from spent: their
    request reaches the engine while the database still holds its reservation."""
    name = "early-metered"
    key = site.create_user(name)
    site.cli("set-limits", "--username", name, "--token-rate-limit", "100000")
    site.cli("set-quota", "--username", name, "--tokens", "100000", "--per", "day")
    first = {**body("first"), "max_tokens": 10}
    assert chat(gateway, key, first).status_code == 200  # the gateway knows what is left

    async def scenario() -> httpx.Response:
        conn = await site.connect()
        try:
            async with conn.transaction():  # the reservation waits for this
                await conn.execute(
                    "SELECT 1 FROM quota_usage WHERE user_id = "
                    "(SELECT id FROM users WHERE username = $1) FOR UPDATE",
                    name,
                )
                request = asyncio.create_task(asyncio.to_thread(
                    chat, gateway, key, {**body("ahead"), "max_tokens": 10}))  # fmt: skip
                await until(lambda: "ahead" in engine.arrivals)
                await asyncio.sleep(0.2)
                assert not request.done()  # its answer waits for the reservation
            return await asyncio.wait_for(request, 10)
        finally:
            await conn.close()

    answer = asyncio.run(scenario())
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-limit-tokens"] == "100000"
    assert ("ahead", 10) in engine.bounds


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
def test_a_quota_taken_meanwhile_sends_the_request_again_bounded(
    site: Site, engine: MockEngine, gateway: str, stream: bool
) -> None:
    """Another gateway spent most of the quota after this one last saw it: the request
    went ahead with its own bound, and goes again with what was reserved for it."""
    name = f"early-rebound-{'stream' if stream else 'chat'}"
    key = site.create_user(name)
    site.cli("set-quota", "--username", name, "--tokens", "1000", "--per", "day")
    assert chat(gateway, key, {**body(f"{name}-first"), "max_tokens": 10}).status_code == 200
    of_user = "user_id = (SELECT id FROM users WHERE username = $1)"

    deadline = time.monotonic() + 10
    while site.query(f"SELECT 1 FROM quota_usage WHERE {of_user} AND used = 9", name) == []:
        assert time.monotonic() < deadline, "the first request was not charged"
        time.sleep(0.05)  # charged: 8 prompt tokens, 1 completion token
    site.query(f"UPDATE quota_usage SET used = used + 800 WHERE {of_user} RETURNING 1", name)

    answer = chat(gateway, key, {**body(name, stream=stream), "max_tokens": 500})

    assert answer.status_code == 200
    assert [bound for tag, bound in engine.bounds if tag == name] == [500, 1000 - 809]
    row = site.row(answer.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (8, 1)
    deadline = time.monotonic() + 10
    while site.query(f"SELECT 1 FROM quota_usage WHERE {of_user} AND used = 818", name) == []:
        assert time.monotonic() < deadline, "not charged the tokens of what it answered"
        time.sleep(0.05)
