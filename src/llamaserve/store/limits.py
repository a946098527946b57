"""Admission: one round trip that checks keys' state and takes their rate-limit tokens,
for one request or a whole batch of them.

The rate limit is GCRA (the generic cell rate algorithm, a token bucket kept as one
timestamp per user): a user may send `limit` requests at once, then one more every
`window / limit` seconds. Each user's state is one row, updated under its row lock,
so the count is exact under concurrency and across any number of gateways sharing
the database, and the database's clock is the only clock.

A batch is admitted as if its requests came one after another in the batch's order:
a user with n requests in it gets the first k tokens that fit, in one update of the
user's row. Rows are locked in user order, so that batches of several gateways never
deadlock.

The gateway runs this on connections that commit without waiting for the WAL flush
(milliseconds per request on ordinary disks): a database crash may forget the last
fraction of a second of bucket updates, which can only let a few requests more through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

_ADMIT = """
WITH k AS (
    SELECT r.ord, u.id AS user_id, u.username, u.enabled, k.revoked_at, k.expires_at,
           COALESCE(u.rate_limit, $2::int) AS lim,
           COALESCE(u.rate_window_seconds, $3::int) AS win,
           COALESCE(u.token_quota, $4::bigint) > 0
               OR COALESCE(u.token_rate_limit, $5::int) > 0 AS metered
    FROM unnest($1::text[]) WITH ORDINALITY AS r(key_id, ord)
    JOIN api_keys k ON k.key_id = r.key_id
    JOIN users u ON u.id = k.user_id
),
wants AS (  -- the requests that take a token: numbered per user, in the batch's order
    SELECT ord, user_id, lim, win, row_number() OVER (PARTITION BY user_id ORDER BY ord) AS pos
    FROM k
    WHERE enabled AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
      AND lim > 0
),
bucket AS (
    SELECT user_id, count(*) AS n, make_interval(secs => min(win)::float8 / min(lim)) AS step,
           make_interval(secs => min(win)) AS burst
    FROM wants GROUP BY user_id
),
locked AS (
    SELECT s.user_id, s.tat
    FROM rate_limit_state s
    WHERE s.user_id IN (SELECT user_id FROM bucket)
    ORDER BY s.user_id
    FOR UPDATE
),
given AS (  -- as many tokens as fit: the largest g <= n with start + g * step <= now + burst
    SELECT b.user_id, b.step, GREATEST(l.tat, now()) AS start,
           CASE WHEN b.step = interval '0' THEN b.n
                ELSE LEAST(b.n, GREATEST(0, floor(
                    extract(epoch FROM now() + b.burst - GREATEST(l.tat, now()))
                    / extract(epoch FROM b.step))))
           END::int AS g
    FROM bucket b JOIN locked l USING (user_id)
),
taken AS (
    UPDATE rate_limit_state s SET tat = given.start + given.g * given.step
    FROM given
    WHERE s.user_id = given.user_id AND given.g > 0
)
SELECT k.*, wants.pos IS NOT NULL AND given.g IS NULL AS no_bucket,
       CASE WHEN wants.pos <= given.g THEN given.start + wants.pos * given.step END
           AS tat_after,
       given.start + given.g * given.step AS tat_before,  -- when this one is refused
       now() AS now
FROM k
LEFT JOIN wants USING (ord)
LEFT JOIN given ON given.user_id = k.user_id
ORDER BY k.ord
"""

_NEW_BUCKETS = """
INSERT INTO rate_limit_state (user_id, tat) SELECT unnest($1::bigint[]), now()
ON CONFLICT (user_id) DO NOTHING
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
    metered: bool = False  # a token quota or token rate limit applies (`store.quotas`)


async def key_hash(conn: Any, *, key_id: str) -> bytes | None:
    """The stored hash of a key (it never changes: rotating makes a new key id)."""
    stored = await conn.fetchval("SELECT key_hash FROM api_keys WHERE key_id = $1", key_id)
    return bytes(stored) if stored is not None else None


async def key_state(conn: Any, *, key_id: str) -> str | None:
    """Whether a key may still be used (ok, disabled, revoked, expired), without taking
    from its user's rate limit; None if it is gone (its user deleted)."""
    row = await conn.fetchrow(
        """SELECT u.enabled, k.revoked_at, k.expires_at, now() AS now
           FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_id = $1""",
        key_id,
    )
    return None if row is None else _state(row)


async def admit(
    conn: Any,
    *,
    key_ids: Sequence[str],
    default_limit: int,
    default_window: int,
    default_quota: int = 0,
    default_tpm: int = 0,
) -> list[Admission | None]:
    """The admissions of requests with these keys, in their order (None for a key that
    does not exist). A key may appear several times: one request each. Each says whether
    its user's tokens are metered (a quota or a token rate limit, theirs or the default)."""
    if not key_ids:
        return []
    args = (default_limit, default_window, default_quota, default_tpm)
    rows: list[Any] = [None] * len(key_ids)
    for row in await conn.fetch(_ADMIT, key_ids, *args):
        rows[row["ord"] - 1] = row
    # A user's first request ever: make the bucket, and admit their requests again.
    again = [i for i, row in enumerate(rows) if row is not None and row["no_bucket"]]
    if again:
        await conn.execute(_NEW_BUCKETS, list({rows[i]["user_id"] for i in again}))
        for i in again:
            rows[i] = None  # unless still found: the user may have been deleted meanwhile
        for row in await conn.fetch(_ADMIT, [key_ids[i] for i in again], *args):
            rows[again[row["ord"] - 1]] = row
    return [None if row is None else _admission(row, _state(row)) for row in rows]


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
        metered=bool(row["metered"]),
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
