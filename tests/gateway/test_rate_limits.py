"""GCRA rate limits: exact under concurrency, across gateways, with OpenAI's headers. On a
real database, with the mock engine: in process, or two gateway processes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import pytest

from tests.gateway.harness import Site
from tests.gateway.helpers import extra_gateway

Get = Callable[[int], Awaitable[httpx.Response]]  # the request of a burst's i-th call


async def burst(get: Get, total: int) -> list[httpx.Response]:
    return list(await asyncio.gather(*(get(i) for i in range(total))))


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


@pytest.mark.anyio
async def test_fifty_concurrent_against_ten_admit_exactly_ten(site: Site) -> None:
    key = site.create_user("burst-one", "--rate-limit", "10", "--window", "600")
    headers = {"Authorization": f"Bearer {key}"}
    async with site.gateway() as gateway:
        responses = await burst(lambda _: gateway.get("/v1/models", headers=headers), 50)
    check_exactly(responses, 10)


def test_two_gateways_on_one_database_admit_exactly_ten(site: Site) -> None:
    key = site.create_user("burst-two", "--rate-limit", "10", "--window", "600")
    headers = {"Authorization": f"Bearer {key}"}

    async def across(urls: tuple[str, str]) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await burst(
                lambda i: client.get(f"{urls[i % 2]}/v1/models", headers=headers), 50
            )

    with extra_gateway(site) as first, extra_gateway(site) as second:
        responses = asyncio.run(across((first, second)))
    check_exactly(responses, 10)


@pytest.mark.anyio
async def test_headers_count_down_and_the_window_refills(site: Site) -> None:
    key = site.create_user("countdown", "--rate-limit", "3", "--window", "3")
    headers = {"Authorization": f"Bearer {key}"}
    remaining = []
    async with site.gateway() as gateway:
        for _ in range(3):
            response = await gateway.get("/v1/models", headers=headers)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "3"
            assert response.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(response.headers["x-ratelimit-remaining-requests"])
        assert remaining == ["2", "1", "0"]
        assert (await gateway.get("/v1/models", headers=headers)).status_code == 429
        await asyncio.sleep(3.2)
        again = [await gateway.get("/v1/models", headers=headers) for _ in range(3)]
    assert [r.status_code for r in again] == [200, 200, 200]


@pytest.mark.anyio
async def test_limits_set_by_the_cli_apply_at_once(site: Site) -> None:
    key = site.create_user("relimited")
    headers = {"Authorization": f"Bearer {key}"}
    async with site.gateway() as gateway:  # running before the limits change
        assert site.cli("set-limits", "--username", "relimited", "--rate-limit", "1",
                        "--window", "600").returncode == 0  # fmt: skip
        assert (await gateway.get("/v1/models", headers=headers)).status_code == 200
        assert (await gateway.get("/v1/models", headers=headers)).status_code == 429
