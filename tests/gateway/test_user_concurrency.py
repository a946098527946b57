"""LLAMA_PROXY_USER_CONCURRENCY holds across gateways on one database: a user at the cap
through one gateway waits in the other's queue until a request of theirs ends, while
other users go on; a request that gives up while so held leaves nothing behind. Two
real gateways and their database, with the mock engine, whose requests take a set
time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.engine.test_launcher import wait_until
from tests.gateway.harness import Site
from tests.gateway.helpers import MockEngine, extra_gateway


@pytest.fixture
def mock_engine() -> Iterator[MockEngine]:
    with MockEngine(slots=4) as mock:  # slots to spare: only the cap holds anyone back
        yield mock


@pytest.fixture
def gateways(site: Site) -> Iterator[tuple[str, str]]:
    """Two gateways on the site's database, each user capped at one request generating."""
    env = {"LLAMA_PROXY_USER_CONCURRENCY": "1"}
    with extra_gateway(site, **env) as first, extra_gateway(site, **env) as second:
        yield first, second


def chat(url: str, key: str, tag: str, delay: float = 0.0, timeout: float = 60) -> str:
    """A chat request that 'generates' for `delay` s; its request id."""
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)
    with client:
        raw = client.chat.completions.with_raw_response.create(
            model="mock",
            messages=[{"role": "user", "content": tag}],
            extra_body={"mock_delay": delay},
        )
    return raw.headers["x-request-id"]


def leases(site: Site) -> Callable[[], bool]:
    return lambda: site.query("SELECT count(*) AS n FROM llama_generating")[0]["n"] == 0


def test_a_user_at_the_cap_through_one_gateway_waits_in_the_other(
    site: Site, gateways: tuple[str, str]
) -> None:
    engine = site.engine
    capped, neighbour = site.create_user("capped"), site.create_user("neighbour")
    first, second = gateways
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(chat, first, capped, "long", delay=2)
        wait_until(lambda: "long" in engine.arrivals, timeout=20)
        short = pool.submit(chat, second, capped, "short")
        chat(second, neighbour, "neighbour")  # another user is not held
        assert engine.finished == ["neighbour"]
        long_id, short_id = long.result(), short.result()

    assert engine.finished == ["neighbour", "long", "short"]  # short began once long ended

    def rows() -> list[Any]:
        return site.query(
            "SELECT request_id, queue_ms FROM llama_requests WHERE request_id = ANY($1)",
            [long_id, short_id],
        )

    wait_until(lambda: len(rows()) == 2, timeout=5)  # written in the background
    queued = {row["request_id"]: row["queue_ms"] for row in rows()}
    assert queued[long_id] < 500 and queued[short_id] > 1000
    wait_until(leases(site), timeout=5)  # every lease given back


def test_a_request_that_gives_up_while_held_leaves_no_lease(
    site: Site, gateways: tuple[str, str]
) -> None:
    engine = site.engine
    key = site.create_user("impatient")
    first, second = gateways
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(chat, first, key, "long", delay=2)
        wait_until(lambda: "long" in engine.arrivals, timeout=20)
        with pytest.raises(openai.APITimeoutError):
            chat(second, key, "gave-up", timeout=0.5)
        long.result()
        began = time.monotonic()
        chat(second, key, "after")  # the cap is free again at once
        assert time.monotonic() - began < 1.5
    assert "gave-up" not in engine.arrivals
    assert engine.finished == ["long", "after"]
    wait_until(leases(site), timeout=5)
