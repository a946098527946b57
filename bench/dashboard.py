"""Scenario e: the dashboard's queries over a request log of 1,000,000 rows.

The stack's private PostgreSQL gets 20 users (each with a token quota) and a million
`llama_requests` rows spread evenly over the last 7 days, written in one
`INSERT ... SELECT ... FROM generate_series` (the rollup trigger runs as for any write),
then vacuumed and analysed as autovacuum would leave them. Each of the page's queries
(`gateway.dashboard.figures`: totals over 24 h and 7 days, the series by hour and by
day, the latency by hour, the quotas) is timed alone and all together (the page's main
query is the 7-day totals; the page runs them all), the median of several runs after
one to warm the cache. For scale, the same 7-day usage computed from the request log
itself (`reports.usage`, what `usage --since 7d` runs); and what the rollup costs a
write: a batch of 100 rows written as the gateway writes it (COPY) with the trigger and
with it disabled.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.stack import ROOT, Stack
from llamaserve.config import load_settings
from llamaserve.gateway.dashboard import figures
from llamaserve.store import dashboard, db, quotas, reports, users
from llamaserve.store.requests import COLUMNS, RequestRow

ROWS = 1_000_000
USERS = 20
RUNS = 9  # timed runs of each query, after one untimed
BATCH = 100  # rows of one request-log write

_SEED = """
INSERT INTO llama_requests (
    request_id, created_at, user_id, username, key_id, method, path, model, stream, status,
    outcome, latency_ms, ttft_ms, queue_ms, bytes_in, bytes_out, prompt_tokens,
    completion_tokens, client_addr, engine)
SELECT 'bench-' || g, now() - random() * interval '7 days', ($2::bigint[])[g % $3 + 1],
       ($4::text[])[g % $3 + 1], 'key', 'POST', '/v1/chat/completions', 'bench', g % 2 = 0,
       CASE WHEN g % 50 = 0 THEN 429 WHEN g % 97 = 0 THEN 502 ELSE 200 END,
       CASE WHEN g % 50 = 0 THEN 'rejected' WHEN g % 97 = 0 THEN 'error' ELSE 'ok' END,
       20 + random() * 2000, 10 + random() * 200, random() * 5, 400, 1200,
       20 + g % 200, 1 + g % 300, '127.0.0.1', 'http://127.0.0.1:8000'
FROM generate_series(1, $1) AS g"""


def run(stack: Stack, quick: bool) -> dict[str, Any]:
    return asyncio.run(_run(stack, RUNS if not quick else 5))


async def _run(stack: Stack, runs: int) -> dict[str, Any]:
    settings, layout = load_settings(ROOT, runtime=stack.runtime)
    conn = await db.connect(settings, layout)
    try:
        seeded = await _seed(conn)
        quota, period = settings.llama_proxy_token_quota, settings.llama_proxy_quota_period
        day, week = timedelta(hours=24), timedelta(days=7)
        queries: dict[str, Callable[[], Awaitable[Any]]] = {
            "totals 7 d (main query)": lambda: dashboard.totals(conn, since=week),
            "totals 24 h": lambda: dashboard.totals(conn, since=day),
            "series by hour, 24 h": lambda: dashboard.series(conn, since=day, step="hour"),
            "series by day, 7 d": lambda: dashboard.series(conn, since=week, step="day"),
            "latency by hour, 24 h": lambda: dashboard.latency(conn, since=day),
            "quotas": lambda: quotas.current_usage(
                conn, default_quota=quota, default_period=period
            ),
            "the whole page": lambda: figures(conn, default_quota=quota, default_period=period),
            "for scale: usage 7 d from the request log": lambda: reports.usage(conn, since=week),
        }
        timed = [{"query": name, **await _time(query, runs)} for name, query in queries.items()]
        writes = await _write_cost(conn, runs)
    finally:
        await conn.close()
    return {"rows": ROWS, "users": USERS, "runs": runs, **seeded, "queries": timed, **writes}


async def _seed(conn: Any) -> dict[str, Any]:
    ids, names = [], []
    for i in range(USERS):
        user = await users.create_user(conn, username=f"dash-{i:02d}")
        await users.set_quota(conn, username=user.username, token_quota=10**9, period="day")
        ids.append(user.id)
        names.append(user.username)
    began = time.perf_counter()
    await conn.execute(_SEED, ROWS, ids, USERS, names)
    seed_s = time.perf_counter() - began
    await conn.execute("VACUUM ANALYZE llama_requests")
    await conn.execute("VACUUM ANALYZE llama_usage_hourly")
    await conn.execute("VACUUM ANALYZE llama_latency_hourly")
    rollup = await conn.fetchval("SELECT count(*) FROM llama_usage_hourly")
    return {"seed_s": round(seed_s, 1), "rollup_rows": rollup}


async def _time(query: Callable[[], Awaitable[Any]], runs: int) -> dict[str, float]:
    await query()  # the cache warmed, as on a page looked at more than once
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        await query()
        times.append((time.perf_counter() - began) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


async def _write_cost(conn: Any, runs: int) -> dict[str, Any]:
    """A batch of the request log written with COPY, with the rollups kept and not."""

    async def write() -> None:
        now = datetime.now(UTC)
        rows = [
            RequestRow(secrets.token_hex(8), now, "POST", "/v1/chat/completions", "127.0.0.1",
                       status=200, username=f"dash-{i % USERS:02d}", latency_ms=100.0,
                       prompt_tokens=20, completion_tokens=30)
            for i in range(BATCH)
        ]  # fmt: skip
        records = [tuple(getattr(row, name) for name in COLUMNS) for row in rows]
        await conn.copy_records_to_table("llama_requests", records=records, columns=COLUMNS)

    kept = await _time(write, runs)
    await conn.execute("ALTER TABLE llama_requests DISABLE TRIGGER llama_requests_written")
    try:
        bare = await _time(write, runs)
    finally:
        await conn.execute("ALTER TABLE llama_requests ENABLE TRIGGER llama_requests_written")
    return {"batch_rows": BATCH, "batch_with_rollup": kept, "batch_without_rollup": bare}
