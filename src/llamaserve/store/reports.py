"""Reports over the request log (`llama_requests`): usage per user, and the latest requests.

Rows are grouped by the username recorded with each request, so the requests of a
deleted user still count, and those that never authenticated form one row of their own
(username None).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg


@dataclass(frozen=True)
class Usage:
    username: str | None  # None: requests that named no valid user
    requests: int
    errors: int  # status >= 400, or an outcome other than ok
    prompt_tokens: int
    completion_tokens: int
    # Generation requests sent to an engine that ended before it counted their tokens
    # (cancelled, failed, or cut off at a stop): whatever they generated is not in the
    # totals.
    uncounted: int
    bytes_in: int
    bytes_out: int
    p50_ms: float | None  # latency of the requests that succeeded
    p95_ms: float | None


@dataclass(frozen=True)
class LoggedRequest:
    id: int
    request_id: str
    created_at: datetime
    user_id: int | None
    username: str | None
    key_id: str | None
    method: str
    path: str
    model: str | None
    stream: bool
    status: int
    outcome: str
    latency_ms: float
    ttft_ms: float | None
    queue_ms: float | None
    bytes_in: int
    bytes_out: int
    prompt_tokens: int | None
    completion_tokens: int | None
    client_addr: str | None
    error: str | None
    engine: str | None


async def usage(
    conn: asyncpg.Connection, *, username: str | None = None, since: timedelta
) -> list[Usage]:
    """Per-user totals of the requests made in the last `since`, busiest user first."""
    rows = await conn.fetch(
        """SELECT username,
                  count(*) AS requests,
                  count(*) FILTER (WHERE status >= 400 OR outcome <> 'ok') AS errors,
                  coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                  coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
                  count(*) FILTER (WHERE completion_tokens IS NULL
                                   AND engine IS NOT NULL
                                   AND outcome IN ('cancelled', 'error')
                                   AND path IN ('/v1/chat/completions', '/v1/completions',
                                                '/v1/responses', '/v1/messages'))
                      AS uncounted,
                  coalesce(sum(bytes_in), 0)::bigint AS bytes_in,  -- sum(bigint) is numeric
                  coalesce(sum(bytes_out), 0)::bigint AS bytes_out,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)
                      FILTER (WHERE status < 400 AND outcome = 'ok') AS p50_ms,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
                      FILTER (WHERE status < 400 AND outcome = 'ok') AS p95_ms
           FROM llama_requests
           WHERE created_at > now() - $1::interval AND ($2::text IS NULL OR username = $2)
           GROUP BY username
           ORDER BY requests DESC, username NULLS LAST""",
        since,
        username,
    )
    return [Usage(**dict(row)) for row in rows]


async def recent(
    conn: asyncpg.Connection, *, username: str | None = None, limit: int = 50
) -> list[LoggedRequest]:
    """The latest `limit` requests, oldest first (like tail)."""
    rows = await conn.fetch(
        """SELECT * FROM (
               SELECT id, request_id, created_at, user_id, username, key_id, method, path,
                      model, stream, status, outcome, latency_ms, ttft_ms, queue_ms,
                      bytes_in, bytes_out, prompt_tokens, completion_tokens, client_addr, error,
                      engine
               FROM llama_requests
               WHERE $1::text IS NULL OR username = $1
               ORDER BY created_at DESC, id DESC
               LIMIT $2
           ) AS latest
           ORDER BY created_at, id""",
        username,
        limit,
    )
    return [LoggedRequest(**dict(row)) for row in rows]
