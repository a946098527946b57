"""The dashboard's SQL: its sessions, and usage from the request log's hourly rollups,
which must agree with the request log itself (`reports.usage`) whatever the rows' ages,
however they were written (one INSERT, a COPY as the gateway writes) or deleted."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from llamaserve.store import dashboard, migrations, reports
from llamaserve.store.requests import COLUMNS, RequestRow
from tests.pgfixtures import PgDatabase, log_request

pytestmark = pytest.mark.anyio
DAY = timedelta(hours=24)
WEEK = timedelta(days=7)
# Ages that straddle both windows' edges and their first, partial hour.
AGES = [
    timedelta(minutes=1), timedelta(minutes=59), timedelta(hours=5),
    timedelta(hours=23, minutes=30), timedelta(hours=23, minutes=59),
    timedelta(hours=24, minutes=1), timedelta(hours=24, minutes=50), timedelta(days=3),
    timedelta(days=6, hours=23, minutes=59),
    timedelta(days=7, minutes=1), timedelta(days=7, minutes=40), timedelta(days=9),
]  # fmt: skip


def summed(rows: list[reports.Usage]) -> list[tuple[object, ...]]:
    return [(r.username, r.requests, r.errors, r.prompt_tokens, r.completion_tokens) for r in rows]


def totalled(rows: list[dashboard.Totals]) -> list[tuple[object, ...]]:
    return [(r.username, r.requests, r.errors, r.prompt_tokens, r.completion_tokens) for r in rows]


async def log_many(conn: asyncpg.Connection) -> None:
    """Rows of three users and an anonymous client at every age, some failed."""
    for i, age in enumerate(AGES):
        await log_request(conn, username="alice", ago=age, prompt_tokens=i, completion_tokens=10)
        await log_request(conn, username="bob", ago=age, prompt_tokens=1, completion_tokens=i)
        if i % 3 == 0:
            await log_request(conn, username="bob", ago=age, status=429, outcome="rejected")
            await log_request(conn, ago=age, status=401, outcome="rejected")
    now = datetime.now(UTC)
    copied = [
        RequestRow(secrets.token_hex(8), now - age, "POST", "/v1/completions", None,
                   status=200, username="carol", prompt_tokens=3, completion_tokens=4,
                   latency_ms=50.0)
        for age in AGES
    ]  # fmt: skip
    records = [tuple(getattr(row, name) for name in COLUMNS) for row in copied]
    await conn.copy_records_to_table("llama_requests", records=records, columns=COLUMNS)


async def test_totals_are_the_usage_of_the_request_log(pg_conn: asyncpg.Connection) -> None:
    await log_many(pg_conn)
    for since in (DAY, WEEK, timedelta(hours=3)):
        expected = summed(await reports.usage(pg_conn, since=since))
        assert totalled(await dashboard.totals(pg_conn, since=since)) == expected
    [bob] = [t for t in await dashboard.totals(pg_conn, since=DAY) if t.username == "bob"]
    assert bob.refusals == 2  # the 429s at 1 minute and 23h59 (ages 0 and 3 of AGES)


async def test_deleted_and_truncated_rows_leave_the_rollups(pg_conn: asyncpg.Connection) -> None:
    await log_many(pg_conn)
    await pg_conn.execute("DELETE FROM llama_requests WHERE username = 'bob' AND status = 200")
    expected = summed(await reports.usage(pg_conn, since=WEEK))
    assert totalled(await dashboard.totals(pg_conn, since=WEEK)) == expected
    assert [t.requests for t in await dashboard.totals(pg_conn, since=WEEK) if t.username == "bob"]
    await pg_conn.execute("TRUNCATE llama_requests")
    assert await dashboard.totals(pg_conn, since=WEEK) == []
    assert await dashboard.latency(pg_conn, since=WEEK) == []


async def test_the_migration_rolls_up_the_rows_logged_before_it(
    pg_empty_database: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await pg_empty_database.connect()
    try:
        shipped = migrations.available()
        before = [m for m in shipped if m.name < "0006"]
        monkeypatch.setattr(migrations, "available", lambda: before)
        await migrations.migrate(conn)
        await log_many(conn)
        monkeypatch.setattr(migrations, "available", lambda: shipped)
        assert await migrations.migrate(conn) == [m.version for m in shipped if m not in before]
        expected = summed(await reports.usage(conn, since=WEEK))
        assert totalled(await dashboard.totals(conn, since=WEEK)) == expected
    finally:
        await conn.close()


async def test_series_by_hour_and_by_day(pg_conn: asyncpg.Connection) -> None:
    await log_many(pg_conn)
    hours = await dashboard.series(pg_conn, since=DAY, step="hour")
    assert all(p.at.minute == 0 and p.at.second == 0 for p in hours)
    assert len({p.at for p in hours}) <= 25
    # Every row from the hour holding now - 24 h on, in its hour.
    rows = await pg_conn.fetch(
        "SELECT username, count(*) AS n, sum(coalesce(completion_tokens, 0)) AS c "
        "FROM llama_requests WHERE created_at >= date_trunc('hour', now() - interval '24 hours',"
        " 'UTC') GROUP BY username"
    )
    for row in rows:
        mine = [p for p in hours if p.username == row["username"]]
        assert sum(p.requests for p in mine) == row["n"]
        assert sum(p.completion_tokens for p in mine) == row["c"]
    days = await dashboard.series(pg_conn, since=WEEK, step="day")
    assert all(p.at.hour == 0 and p.at.tzinfo is not None for p in days)
    assert sum(p.requests for p in days) == await pg_conn.fetchval(
        "SELECT count(*) FROM llama_requests "
        "WHERE created_at >= date_trunc('day', now() - interval '7 days', 'UTC')"
    )


async def test_latency_percentiles_from_the_histogram(pg_conn: asyncpg.Connection) -> None:
    latencies = [float(ms) for ms in range(10, 1010, 10)]  # 10 .. 1000 ms
    for ms in latencies:
        await log_request(pg_conn, latency_ms=ms, username="alice")
    await log_request(pg_conn, latency_ms=90000.0, status=502, outcome="error")  # not counted
    [alice] = await reports.usage(pg_conn, since=DAY, username="alice")
    [hour] = [h for h in await dashboard.latency(pg_conn, since=DAY) if h.requests]
    assert hour.requests == len(latencies)
    assert alice.p50_ms is not None and alice.p95_ms is not None
    assert alice.p50_ms <= hour.p50_ms <= alice.p50_ms * 1.1
    assert alice.p95_ms <= hour.p95_ms <= alice.p95_ms * 1.1


async def test_sessions_open_expire_and_close(pg_conn: asyncpg.Connection) -> None:
    token, stale, other = (hashlib.sha256(secrets.token_bytes(32)).digest() for _ in range(3))
    await dashboard.open_session(pg_conn, token_hash=stale, ttl=timedelta(seconds=-1))
    await dashboard.open_session(pg_conn, token_hash=token, ttl=timedelta(hours=1))
    assert await dashboard.session_open(pg_conn, token_hash=token)
    assert not await dashboard.session_open(pg_conn, token_hash=stale)
    assert not await dashboard.session_open(pg_conn, token_hash=other)
    await dashboard.open_session(pg_conn, token_hash=other, ttl=timedelta(hours=1))
    stored = {r[0] for r in await pg_conn.fetch("SELECT token_hash FROM llama_dashboard_sessions")}
    assert stored == {token, other}  # the expired one forgotten as another opened
    await dashboard.close_session(pg_conn, token_hash=token)
    assert not await dashboard.session_open(pg_conn, token_hash=token)
    assert await dashboard.session_open(pg_conn, token_hash=other)
