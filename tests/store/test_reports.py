"""Reports over the request log: usage per user and the latest requests."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from llamaserve.store import reports
from tests.pgfixtures import log_request

pytestmark = pytest.mark.anyio
DAY = timedelta(hours=24)


async def test_usage_per_user(pg_conn: asyncpg.Connection) -> None:
    for latency in (100.0, 200.0, 300.0, 400.0):
        await log_request(
            pg_conn,
            username="alice",
            latency_ms=latency,
            prompt_tokens=10,
            completion_tokens=20,
            bytes_in=2**33,  # sums past 32 bits
            bytes_out=1000,
        )
    await log_request(pg_conn, username="alice", status=429, outcome="rejected", latency_ms=1.0)
    await log_request(pg_conn, username="alice", status=200, outcome="cancelled", latency_ms=9.0)
    await log_request(pg_conn, username="alice", ago=timedelta(days=2))
    await log_request(pg_conn, username="bob", status=502, outcome="error")
    await log_request(pg_conn, status=401, outcome="rejected")  # never authenticated

    rows = await reports.usage(pg_conn, since=DAY)

    assert [r.username for r in rows] == ["alice", "bob", None]  # busiest first, anonymous last
    alice, bob, anonymous = rows
    assert (alice.requests, alice.errors) == (6, 2)
    assert (alice.prompt_tokens, alice.completion_tokens) == (40, 80)
    assert (alice.bytes_in, alice.bytes_out) == (4 * 2**33, 4000)
    assert all(isinstance(v, int) for v in (alice.prompt_tokens, alice.bytes_in, alice.bytes_out))
    # Latency of the successful requests only: percentile_cont of 100, 200, 300, 400.
    assert (alice.p50_ms, alice.p95_ms) == (250.0, 385.0)
    assert (bob.requests, bob.errors, bob.p50_ms, bob.p95_ms) == (1, 1, None, None)
    assert (anonymous.requests, anonymous.errors) == (1, 1)


async def test_usage_of_one_user_and_since(pg_conn: asyncpg.Connection) -> None:
    await log_request(pg_conn, username="alice", ago=timedelta(hours=2))
    await log_request(pg_conn, username="alice", ago=timedelta(days=3))
    await log_request(pg_conn, username="bob")

    [alice] = await reports.usage(pg_conn, username="alice", since=timedelta(hours=3))
    assert alice.requests == 1
    [alice] = await reports.usage(pg_conn, username="alice", since=timedelta(days=7))
    assert alice.requests == 2
    assert await reports.usage(pg_conn, username="alice", since=timedelta(hours=1)) == []


async def test_recent_is_the_latest_rows_oldest_first(pg_conn: asyncpg.Connection) -> None:
    for minutes in (5, 4, 3, 2, 1):
        await log_request(
            pg_conn, request_id=f"a{minutes}", username="alice", ago=timedelta(minutes=minutes)
        )
    await log_request(pg_conn, request_id="b0", username="bob")

    latest = await reports.recent(pg_conn, limit=3)
    assert [r.request_id for r in latest] == ["a2", "a1", "b0"]
    alices = await reports.recent(pg_conn, username="alice", limit=50)
    assert [r.request_id for r in alices] == ["a5", "a4", "a3", "a2", "a1"]
    assert alices[0].path == "/v1/chat/completions" and alices[0].status == 200
