"""GCRA rate limits: exact under concurrency, across gateways, with OpenAI's headers."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from tests.gateway.conftest import Stack
from tests.gateway.helpers import extra_gateway


async def burst(urls: list[str], key: str, total: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        calls = [
            client.get(
                f"{urls[i % len(urls)]}/v1/models", headers={"Authorization": f"Bearer {key}"}
            )
            for i in range(total)
        ]
        return list(await asyncio.gather(*calls))


def check_exactly(responses: list[httpx.Response], admitted: int) -> None:
    assert Counter(r.status_code for r in responses) == {
        200: admitted,
        429: len(responses) - admitted,
    }
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert response.headers["x-ratelimit-remaining-requests"] == "0"


def test_fifty_concurrent_against_ten_admit_exactly_ten(stack: Stack) -> None:
    key = stack.create_user("burst-one", "--rate-limit", "10", "--window", "600")
    check_exactly(asyncio.run(burst([stack.gateway_url], key, 50)), 10)


def test_two_gateways_on_one_database_admit_exactly_ten(stack: Stack) -> None:
    key = stack.create_user("burst-two", "--rate-limit", "10", "--window", "600")
    with extra_gateway(stack) as second:
        responses = asyncio.run(burst([stack.gateway_url, second], key, 50))
    check_exactly(responses, 10)


def test_headers_count_down_and_the_window_refills(stack: Stack) -> None:
    key = stack.create_user("countdown", "--rate-limit", "3", "--window", "3")
    headers = {"Authorization": f"Bearer {key}"}
    remaining = []
    for _ in range(3):
        response = httpx.get(f"{stack.gateway_url}/v1/models", headers=headers)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    assert httpx.get(f"{stack.gateway_url}/v1/models", headers=headers).status_code == 429
    time.sleep(3.2)
    again = [httpx.get(f"{stack.gateway_url}/v1/models", headers=headers) for _ in range(3)]
    assert [r.status_code for r in again] == [200, 200, 200]


def test_limits_set_by_the_cli_apply_at_once(stack: Stack) -> None:
    key = stack.create_user("relimited")
    headers = {"Authorization": f"Bearer {key}"}
    assert stack.cli("set-limits", "--username", "relimited", "--rate-limit", "1",
                     "--window", "600").returncode == 0  # fmt: skip
    assert httpx.get(f"{stack.gateway_url}/v1/models", headers=headers).status_code == 200
    assert httpx.get(f"{stack.gateway_url}/v1/models", headers=headers).status_code == 429
