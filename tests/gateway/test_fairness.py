"""Fairness by tokens through a real gateway and database, with the mock engine: two
users with backlogs, one whose requests cost many tokens per second of an engine's slot
and one whose requests cost few, are served about as many tokens each; the round-robin
of requests (LLAMA_PROXY_FAIRNESS=requests) gives the heavy one several times more. And
what a request is charged before it runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llamaserve.gateway.fairness import BYTES_PER_TOKEN, COMPLETION_GUESS, expected_tokens
from tests.gateway.harness import Site
from tests.gateway.helpers import MockEngine, mock_request

SECONDS = 3.0  # of both users backlogged, counted
# Not counted: the heavy user's first requests take the free slots before the light
# user's arrive (then lifted to the heavy user's counter, as any newcomer).
WARMUP = 0.5
# (clients, seconds in a slot, completion tokens, max_tokens sent) of each user: per
# second of a slot, the heavy user's requests cost about 4 times the light user's. The
# heavy user sends no bound: its charge is a guess until the engine's count corrects it.
USERS = {"heavy": (4, 0.08, 200, None), "light": (8, 0.04, 20, 20)}


@pytest.fixture
def mock_engine() -> Iterator[MockEngine]:
    with MockEngine(slots=2) as mock:
        mock.record = False  # hundreds of requests
        yield mock


def test_a_request_is_charged_its_size_and_its_bound_until_it_ends() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 7}
    assert expected_tokens("/v1/chat/completions", body, 400) == 400 // BYTES_PER_TOKEN + 7
    del body["max_tokens"]
    assert expected_tokens("/v1/chat/completions", body, 40) == 10 + COMPLETION_GUESS
    assert expected_tokens("/v1/embeddings", None, 40) == 10  # generates nothing


async def backlogged(gateway: httpx.AsyncClient, keys: dict[str, str]) -> dict[str, int]:
    """The tokens (the engine's usage) of the requests each user saw end in SECONDS of
    both keeping their clients busy, after WARMUP."""
    start = time.monotonic() + WARMUP
    deadline = start + SECONDS
    served = dict.fromkeys(keys, 0)

    async def client(user: str) -> None:
        _, seconds, tokens, bound = USERS[user]
        body: dict[str, Any] = {**mock_request(user, delay=seconds), "mock_tokens": tokens}
        if bound is not None:
            body["max_tokens"] = bound
        headers = {"Authorization": f"Bearer {keys[user]}"}
        while time.monotonic() < deadline:
            answer = await gateway.post("/v1/chat/completions", json=body, headers=headers)
            assert answer.status_code == 200, answer.text
            if start <= time.monotonic() < deadline:
                usage = answer.json()["usage"]
                served[user] += usage["prompt_tokens"] + usage["completion_tokens"]

    clients = [client(user) for user in keys for _ in range(USERS[user][0])]
    await asyncio.gather(*clients)
    return served


@pytest.mark.anyio
@pytest.mark.parametrize("fairness", ["tokens", "requests"])
async def test_two_backlogged_users_are_served_tokens_alike(site: Site, fairness: str) -> None:
    keys = {user: site.create_user(f"{user}_{fairness}") for user in USERS}
    async with site.gateway(llama_proxy_fairness=fairness) as gateway:
        served = await backlogged(gateway, keys)
    ratio = served["heavy"] / served["light"]
    if fairness == "tokens":
        assert 1 / 1.2 <= ratio <= 1.2, served
    else:  # a slot each: the heavy user gets its 4 times more
        assert ratio > 2.5, served
