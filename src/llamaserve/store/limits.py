"""Admission: one round trip that checks a key's state and takes a rate-limit token.

The rate limit is GCRA (the generic cell rate algorithm, a token bucket kept as one
timestamp per user): a user may send `limit` requests at once, then one more every
`window / limit` seconds. Each user's state is one row, updated under its row lock,
so the count is exact under concurrency and across any number of gateways sharing
the database, and the database's clock is the only clock.

The gateway runs this on connections that commit without waiting for the WAL flush
(milliseconds per request on ordinary disks): a database crash may forget the last
fraction of a second of bucket updates, which can only let a few requests more through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

_ADMIT = """
WITH k AS (
    SELECT u.id AS user_id, u.username, u.enabled, k.revoked_at, k.expires_at,
           COALESCE(u.rate_limit, $2::int) AS lim,
           COALESCE(u.rate_window_seconds, $3::int) AS win
    FROM api_keys k JOIN users u ON u.id = k.user_id
    WHERE k.key_id = $1
),
bucket AS (
    SELECT user_id, make_interval(secs => win::float8 / lim) AS step,
           make_interval(secs => win) AS burst
    FROM k
    WHERE enabled AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
      AND lim > 0
),
taken AS (
    UPDATE rate_limit_state s SET tat = GREATEST(s.tat, now()) + bucket.step
    FROM bucket
    WHERE s.user_id = bucket.user_id
      AND GREATEST(s.tat, now()) + bucket.step <= now() + bucket.burst
    RETURNING s.tat
)
SELECT k.*, (SELECT tat FROM taken) AS tat_after,
       (SELECT tat FROM rate_limit_state WHERE user_id = k.user_id) AS tat_before,
       now() AS now
FROM k
"""

_NEW_BUCKET = """
INSERT INTO rate_limit_state (user_id, tat) VALUES ($1, now()) ON CONFLICT (user_id) DO NOTHING
"""


@dataclass(frozen=True)
class Admission:
    user_id: int
    username: str
    state: str  # ok | disabled | revoked | expired
    limit: int  # 0 = no limit
    window: int
    allowed: bool
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until one more request fits (when not allowed)


async def key_hash(conn: Any, *, key_id: str) -> bytes | None:
    """The stored hash of a key (it never changes: rotating makes a new key id)."""
    stored = await conn.fetchval("SELECT key_hash FROM api_keys WHERE key_id = $1", key_id)
    return bytes(stored) if stored is not None else None


async def admit(
    conn: Any, *, key_id: str, default_limit: int, default_window: int
) -> Admission | None:
    """The admission of one request with this key, or None when no such key exists."""
    row = await conn.fetchrow(_ADMIT, key_id, default_limit, default_window)
    if row is None:
        return None
    state = _state(row)
    if state == "ok" and row["lim"] > 0 and row["tat_before"] is None:
        await conn.execute(_NEW_BUCKET, row["user_id"])  # the user's first request ever
        row = await conn.fetchrow(_ADMIT, key_id, default_limit, default_window)
    return _admission(row, state)


def _state(row: Any) -> str:
    if not row["enabled"]:
        return "disabled"
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= row["now"]:
        return "expired"
    return "ok"


def _admission(row: Any, state: str) -> Admission:
    limit, window = int(row["lim"]), int(row["win"])
    base = Admission(
        user_id=row["user_id"],
        username=row["username"],
        state=state,
        limit=limit,
        window=window,
        allowed=state == "ok",
        remaining=0,
        reset_seconds=0.0,
        retry_after=0.0,
    )
    if state != "ok" or limit == 0:
        return base
    now: datetime = row["now"]
    step = window / limit
    if row["tat_after"] is not None:
        ahead = (row["tat_after"] - now).total_seconds()
        remaining = math.floor((window - ahead) / step + 1e-9)
        return replace(base, remaining=max(0, remaining), reset_seconds=ahead)
    ahead = (row["tat_before"] - now).total_seconds()
    return replace(
        base, allowed=False, reset_seconds=ahead, retry_after=max(0.0, ahead + step - window)
    )
