"""Token quotas and tokens-per-minute limits through the gateway: exact across two gateway
processes on one database (the mock engine: 8 prompt tokens and 1 completion token per
request), and with the real model where the tokens are the engine's own."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from llamaserve.gateway.quotas import Quotas
from llamaserve.store import db, users
from llamaserve.store import quotas as store_quotas
from llamaserve.store.requests import RequestRow
from tests.conftest import raw_post
from tests.gateway.conftest import Stack
from tests.gateway.harness import Site
from tests.gateway.helpers import extra_gateway
from tests.gateway.helpers import mock_request as chat
from tests.gateway.test_cut_requests import leave_after
from tests.pgfixtures import PgDatabase

MOCK_PROMPT_TOKENS = 8  # each mock request's prompt; its completion is 1 token
MOCK_TOKENS = MOCK_PROMPT_TOKENS + 1


async def across(
    urls: tuple[str, str], key: str, total: int, **extra: object
) -> list[httpx.Response]:
    """`total` requests at once, alternating between two gateways."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*(
            client.post(f"{urls[i % 2]}/v1/chat/completions", headers=headers,
                        json={**chat(f"q{i}"), **extra})
            for i in range(total)
        )))  # fmt: skip


def charged(site: Site, username: str) -> tuple[int, int]:
    """The user's quota use in its current period (used, reserved), and their rows' tokens."""
    [usage] = site.query(
        "SELECT q.used, q.reserved FROM quota_usage q JOIN users u ON u.id = q.user_id "
        "WHERE u.username = $1",
        username,
    )
    return usage["used"], usage["reserved"]


def rows_tokens(site: Site, username: str) -> int:
    return int(site.query(
        "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM llama_requests "
        "WHERE username = $1", username)[0][0])  # fmt: skip


def rows_logged(site: Site, username: str) -> int:
    return len(site.query("SELECT 1 FROM llama_requests WHERE username = $1", username))


def wait_for(condition: object, timeout: float = 10.0) -> None:
    began = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - began < timeout, "not within the time"
        time.sleep(0.05)


def test_fifty_at_once_through_two_gateways_never_pass_the_quota(site: Site) -> None:
    key = site.create_user("quota-race")
    assert site.cli("set-quota", "--username", "quota-race", "--tokens", str(10 * MOCK_TOKENS),
                    "--per", "day").returncode == 0  # fmt: skip
    with extra_gateway(site) as first, extra_gateway(site) as second:
        # Each reserves its completion bound, 9: ten fit in the quota of 90.
        responses = asyncio.run(across((first, second), key, 50, max_tokens=MOCK_TOKENS))
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: 10, 429: 40}, statuses
        for refused in (r for r in responses if r.status_code == 429):
            error = refused.json()["error"]
            assert error["type"] == error["code"] == "insufficient_quota"
            assert "renews at" in error["message"] and int(refused.headers["retry-after"]) >= 1
        # Every row logged and every charge settled: the rows' tokens are the quota's use.
        wait_for(lambda: rows_logged(site, "quota-race") == 50)
        wait_for(lambda: charged(site, "quota-race") == (rows_tokens(site, "quota-race"), 0))
    used, _ = charged(site, "quota-race")
    # Over the quota by no more than the admitted requests' prompts. A refused request that
    # went ahead of its admission to the engine is charged what the engine did for it (the
    # docs' second overshoot), within the same bound here.
    admitted_prompts = 10 * MOCK_PROMPT_TOKENS
    assert 10 * MOCK_TOKENS <= used <= 10 * MOCK_TOKENS + admitted_prompts


def test_a_completion_cannot_take_more_than_is_left(site: Site) -> None:
    """The completion's bound is lowered to what is left: the engine is asked for no more."""
    key = site.create_user("quota-bound")
    site.cli("set-quota", "--username", "quota-bound", "--tokens", "20", "--per", "week")
    headers = {"Authorization": f"Bearer {key}"}
    with extra_gateway(site) as url:
        first = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                           json={**chat("a"), "max_tokens": 500}, timeout=60)  # fmt: skip
        assert first.status_code == 200
        wait_for(lambda: charged(site, "quota-bound") == (MOCK_TOKENS, 0))
        second = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                            json={**chat("b"), "max_tokens": 500}, timeout=60)  # fmt: skip
        assert second.status_code == 200
        wait_for(lambda: charged(site, "quota-bound") == (2 * MOCK_TOKENS, 0))
        third = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                           json={**chat("c"), "max_tokens": 500}, timeout=60)  # fmt: skip
        # 2 tokens were left: admitted, its completion bounded to them.
        assert third.status_code == 200
        wait_for(lambda: charged(site, "quota-bound")[1] == 0)
        refused = httpx.post(f"{url}/v1/messages", headers={"x-api-key": key}, timeout=60,
                             json={"model": "mock", "max_tokens": 5,
                                   "messages": [{"role": "user", "content": "d"}]})  # fmt: skip
    assert refused.status_code == 429
    body = refused.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "quota" in body["error"]["message"]


def test_the_period_renews(site: Site) -> None:
    key = site.create_user("quota-renews")
    site.cli("set-quota", "--username", "quota-renews", "--tokens", str(MOCK_TOKENS), "--per", "3s")
    headers = {"Authorization": f"Bearer {key}"}
    body = {**chat("r"), "max_tokens": 1}
    with extra_gateway(site) as url:
        post = lambda: httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body,  # noqa: E731
                                  timeout=60)  # fmt: skip
        assert post().status_code == 200
        refused = None
        for _ in range(40):  # until charged, within the same 3 s window
            refused = post()
            if refused.status_code == 429:
                break
            time.sleep(0.05)
        assert refused is not None and refused.status_code == 429
        time.sleep(max(0.0, int(refused.headers["retry-after"])) + 0.2)
        assert post().status_code == 200


def test_tokens_per_minute_count_down_and_refuse_across_gateways(site: Site) -> None:
    key = site.create_user("tpm")
    limit = 40  # 4 requests leave 4 tokens (and what refilled): a 5th is admitted, a 6th not
    assert site.cli("set-limits", "--username", "tpm", "--token-rate-limit",
                    str(limit)).returncode == 0  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    with extra_gateway(site) as first, extra_gateway(site) as second:
        remaining = []
        for i in range(5):
            url = (first, second)[i % 2]
            response = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                                  json={**chat(f"t{i}"), "max_tokens": 1}, timeout=60)  # fmt: skip
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-tokens"] == str(limit)
            assert response.headers["x-ratelimit-reset-tokens"]
            remaining.append(int(response.headers["x-ratelimit-remaining-tokens"]))
            time.sleep(0.3)  # charged before the next one
        # What was left when each was admitted: it falls as requests are charged
        # (and refills by 40 tokens a minute meanwhile, under one token per request).
        assert remaining[0] == limit
        assert all(later < earlier for earlier, later in itertools.pairwise(remaining))
        refused = httpx.post(f"{second}/v1/chat/completions", headers=headers,
                             json={**chat("over"), "max_tokens": 1}, timeout=60)  # fmt: skip
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def username_of(stack: Stack, key: str) -> str:
    return str(stack.query("SELECT username FROM users u JOIN api_keys k ON k.user_id = u.id "
                           "WHERE k.key_id = $1", key.split("_")[1])[0][0])  # fmt: skip


def quota_use(stack: Stack, username: str) -> tuple[int, int]:
    [usage] = stack.query("SELECT used, reserved FROM quota_usage q JOIN users u "
                          "ON u.id = q.user_id WHERE u.username = $1", username)  # fmt: skip
    return usage["used"], usage["reserved"]


def test_the_real_models_answer_ends_at_the_quota(stack: Stack, alice: str) -> None:
    username = username_of(stack, alice)
    assert stack.cli("set-quota", "--username", username, "--tokens", "60",
                     "--per", "month").returncode == 0  # fmt: skip
    client = stack.client(alice)
    raw = client.chat.completions.with_raw_response.create(
        model=stack.model, messages=[{"role": "user", "content": "the the the the"}],
        max_tokens=2000, temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    answer = raw.parse()
    assert answer.usage is not None
    # The completion took all the quota had left: 60, and stopped there.
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 60
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model=stack.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
    assert refused.value.code == "insufficient_quota"
    # Used up: the completion's 60, and its prompt (the overshoot the docs state).
    wait_for(lambda: quota_use(stack, username) == (answer.usage.total_tokens, 0))  # type: ignore[union-attr]
    row = stack.row(raw.headers["x-request-id"])
    assert row["prompt_tokens"] + row["completion_tokens"] == answer.usage.total_tokens


def test_clients_that_leave_are_charged_what_they_cost(stack: Stack, alice: str) -> None:
    username = username_of(stack, alice)
    assert stack.cli("set-quota", "--username", username, "--tokens", "1000000",
                     "--per", "day").returncode == 0  # fmt: skip
    body = {"model": stack.model, "messages": [{"role": "user", "content": "Fruits:"}],
            "max_tokens": 2000, "temperature": 0, "ignore_eos": True}  # fmt: skip
    ids = [leave_after(stack, alice, "/v1/chat/completions", body, n) for n in range(1, 21)]
    rows = [stack.row(request_id) for request_id in ids]
    assert all(row["completion_tokens"] >= n for n, row in enumerate(rows, start=1))
    # And one that did not stream, left while the engine generated.
    with raw_post(stack.gateway_url, alice, "/v1/chat/completions", body):
        time.sleep(1.0)
    wait_for(lambda: len(stack.query("SELECT 1 FROM llama_requests WHERE key_id = $1",
                                     alice.split("_")[1])) == 21)  # fmt: skip
    rows = stack.query("SELECT * FROM llama_requests WHERE key_id = $1", alice.split("_")[1])
    assert all(row["outcome"] == "cancelled" and row["completion_tokens"] > 0 for row in rows)
    total = sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)

    wait_for(lambda: quota_use(stack, username) == (total, 0))


class AwayPool:
    """The real pool, with the database away for the first `refusals` connections."""

    def __init__(self, pool: asyncpg.Pool, refusals: int) -> None:
        self.pool, self.refusals = pool, refusals

    def acquire(self) -> Any:
        self.refusals -= 1
        if self.refusals >= 0:
            raise ConnectionRefusedError("the database went away")
        return self.pool.acquire()


@pytest.mark.anyio
async def test_charges_wait_for_a_database_that_went_away(pg_database: PgDatabase) -> None:
    """A request's tokens are charged once the database answers again, not dropped: its
    row is written then too (the request log's spool), and the two must agree."""
    pool = await db.create_pool(pg_database.settings, pg_database.layout)
    try:
        async with pool.acquire() as conn:
            await users.create_user(conn, username="alice")
            await users.set_quota(conn, username="alice", token_quota=1000, period="day")
            alice = (await users.get_user(conn, username="alice")).id  # type: ignore[union-attr]
            [reservation] = await store_quotas.reserve_many(
                conn, asks=[(alice, 100)], default_quota=0, default_period="day",
                default_tpm=0,
            )  # fmt: skip
        charges = Quotas(AwayPool(pool, refusals=2), default_quota=0, default_period="day",
                         default_tpm=0, gather=0)  # fmt: skip
        row = RequestRow(request_id="r", created_at=datetime.now(UTC), method="POST",
                         path="/v1/chat/completions", client_addr=None, user_id=alice,
                         prompt_tokens=12, completion_tokens=30)  # fmt: skip
        charges.settle(reservation, row)
        began = time.monotonic()
        async with pool.acquire() as conn:
            while await conn.fetchval("SELECT used FROM quota_usage") == 0:
                assert time.monotonic() - began < 10, "never charged"
                await asyncio.sleep(0.1)
            assert tuple(await conn.fetchrow("SELECT used, reserved FROM quota_usage")) == (42, 0)
        await charges.close()
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_a_request_that_reserved_nothing_is_charged_to_the_current_period(
    pg_database: PgDatabase,
) -> None:
    """One sent ahead of its admission while its user had no quota yet: its tokens are
    charged all the same, in the same batch as another's reserved charge."""
    pool = await db.create_pool(pg_database.settings, pg_database.layout)
    try:
        async with pool.acquire() as conn:
            for name in ("alice", "bob"):
                await users.create_user(conn, username=name)
                await users.set_quota(conn, username=name, token_quota=1000, period="week")
            ids = [(await users.get_user(conn, username=n)).id for n in ("alice", "bob")]  # type: ignore[union-attr]
            [bobs] = await store_quotas.reserve_many(
                conn, asks=[(ids[1], 50)], default_quota=0, default_period="day", default_tpm=0
            )
        charges = Quotas(pool, default_quota=0, default_period="day", default_tpm=0)
        for user_id, reservation, tokens in ((ids[0], None, 7), (ids[1], bobs, 20)):
            charges.settle(reservation, RequestRow(
                request_id=f"r{user_id}", created_at=datetime.now(UTC), method="POST",
                path="/v1/chat/completions", client_addr=None, user_id=user_id,
                prompt_tokens=tokens - 2, completion_tokens=2,
            ))  # fmt: skip
        await charges.close()
        async with pool.acquire() as conn:
            found = await conn.fetch("SELECT user_id, used, reserved FROM quota_usage ORDER BY 1")
        assert [tuple(f) for f in found] == [(ids[0], 7, 0), (ids[1], 20, 0)]
    finally:
        await pool.close()
