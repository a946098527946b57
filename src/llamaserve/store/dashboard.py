"""The dashboard's SQL: the operator's sessions, and usage read from the hourly rollups of
the request log (`llama_usage_hourly`, `llama_latency_hourly`, kept by a trigger on
`llama_requests`: see migration 0006).

A week is at most 168 rollup rows per user, whatever the number of requests. Totals over
a window are exact all the same, the window as `reports.usage` takes it (the last 24
hours to the microsecond, not whole hours): the rollups for the whole hours in it, and
the request log itself, by its time index, for the part of the first hour in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

# Sessions


async def open_session(conn: Any, *, token_hash: bytes, ttl: timedelta) -> None:
    """Record a new session, valid for `ttl`; forget the sessions that have expired."""
    async with conn.transaction():
        await conn.execute("DELETE FROM llama_dashboard_sessions WHERE expires_at < now()")
        await conn.execute(
            "INSERT INTO llama_dashboard_sessions (token_hash, expires_at) "
            "VALUES ($1, now() + $2::interval)",
            token_hash,
            ttl,
        )


async def session_open(conn: Any, *, token_hash: bytes) -> bool:
    """Whether the session exists and has not expired, by the database's clock."""
    found = await conn.fetchval(
        "SELECT true FROM llama_dashboard_sessions WHERE token_hash = $1 AND expires_at > now()",
        token_hash,
    )
    return bool(found)


async def close_session(conn: Any, *, token_hash: bytes) -> None:
    await conn.execute("DELETE FROM llama_dashboard_sessions WHERE token_hash = $1", token_hash)


# Usage


@dataclass(frozen=True)
class Totals:
    """A user's requests over a window (username None: those that named no valid user)."""

    username: str | None
    requests: int
    errors: int  # status >= 400, or an outcome other than ok (as `usage` counts them)
    refusals: int  # the 429s among the errors: rate limits, quotas, full queues
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Point:
    """A user's requests in one hour or day (`at`, its start in UTC)."""

    at: datetime
    username: str | None
    requests: int
    errors: int
    refusals: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Latency:
    """The latency of the requests that succeeded in one hour, from its histogram (within
    9% of the exact percentile)."""

    at: datetime
    requests: int
    p50_ms: float
    p95_ms: float


_SUMS = """sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,
           sum(refusals)::bigint AS refusals, sum(prompt_tokens)::bigint AS prompt_tokens,
           sum(completion_tokens)::bigint AS completion_tokens"""

_TOTALS = f"""
    SELECT username, {_SUMS}
    FROM (
        SELECT username, requests, errors, refusals, prompt_tokens, completion_tokens
        FROM llama_usage_hourly
        WHERE hour >= date_trunc('hour', now() - $1::interval, 'UTC') + interval '1 hour'
        UNION ALL
        SELECT username, 1, (status >= 400 OR outcome <> 'ok')::int, (status = 429)::int,
               coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0)
        FROM llama_requests
        WHERE created_at > now() - $1::interval
          AND created_at < date_trunc('hour', now() - $1::interval, 'UTC') + interval '1 hour'
    ) AS parts
    GROUP BY username
    HAVING sum(requests) > 0
    ORDER BY requests DESC, username NULLS LAST"""


async def totals(conn: Any, *, since: timedelta) -> list[Totals]:
    """Per-user totals of the requests made in the last `since`, busiest user first:
    the same rows, window and counts as `reports.usage`."""
    return [Totals(**dict(row)) for row in await conn.fetch(_TOTALS, since)]


async def series(conn: Any, *, since: timedelta, step: Literal["hour", "day"]) -> list[Point]:
    """Per-user sums by hour or day (UTC), from the one holding `now() - since` on."""
    rows = await conn.fetch(
        f"""SELECT date_trunc($2, hour, 'UTC') AS at, username, {_SUMS}
            FROM llama_usage_hourly
            WHERE hour >= date_trunc($2, now() - $1::interval, 'UTC')
            GROUP BY 1, 2
            HAVING sum(requests) > 0
            ORDER BY 1, 2""",
        since,
        step,
    )
    return [Point(**dict(row)) for row in rows]


async def latency(conn: Any, *, since: timedelta) -> list[Latency]:
    """p50 and p95 by hour, from the hour holding `now() - since` on: each the upper
    bound of the histogram's bucket that holds it."""
    rows = await conn.fetch(
        """WITH buckets AS (
               SELECT hour, bucket,
                      sum(requests) OVER (PARTITION BY hour ORDER BY bucket) AS upto,
                      sum(requests) OVER (PARTITION BY hour) AS total
               FROM llama_latency_hourly
               WHERE hour >= date_trunc('hour', now() - $1::interval, 'UTC') AND requests > 0
           )
           SELECT hour AS at, total::bigint AS requests,
                  power(2, (min(bucket) FILTER (WHERE upto >= 0.5 * total))::float8 / 8) AS p50_ms,
                  power(2, (min(bucket) FILTER (WHERE upto >= 0.95 * total))::float8 / 8) AS p95_ms
           FROM buckets
           GROUP BY hour, total
           ORDER BY hour""",
        since,
    )
    return [Latency(**dict(row)) for row in rows]


async def usernames(conn: Any, *, ids: list[int]) -> dict[int, str]:
    """The usernames of these user ids (those that still exist)."""
    rows = await conn.fetch("SELECT id, username FROM users WHERE id = ANY($1::bigint[])", ids)
    return {row["id"]: row["username"] for row in rows}
