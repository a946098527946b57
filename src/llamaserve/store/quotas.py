"""Token quotas and the tokens-per-minute limit: admission (`reserve`) and charge
(`settle`), each one statement, exact across any number of gateways on the database.

A quota is a number of tokens (prompt and completion) per period. Periods are `day`,
`week` (ISO: from Monday) and `month`, calendar periods in UTC, or a span of whole
seconds (`21600s` for 6 h), a fixed window aligned on the Unix epoch in UTC (00:00,
06:00, 12:00, 18:00 for 6 h). Their bounds are computed in SQL from the database's
clock (`llama_quota_period(period, at)`, called with now()), never this machine's.

A request is admitted while its user has quota left (used + reserved < quota): its
completion may then take at most what is left (`granted`, reserved until the request is
charged its real tokens). So the only overshoot of a quota is the prompt tokens of the
requests admitted before it ran out. Each user's period is one row, changed by
`INSERT ... ON CONFLICT DO UPDATE ... WHERE`, which locks the row and judges its latest
version: the quota is exact under concurrency, including the first request of a period.

The tokens-per-minute limit is a token bucket: capacity the limit, refilling at
limit / 60 per second by the database's clock. A request is admitted while the level is
above 0 and charged its real tokens when it ends, so the level may go below 0 (a debt
that refilling pays off). Admission locks the bucket's row (and refills it), so the
level it judges is the latest.

Charges are settled in batches too (`settle_many`). Lock order, in both statements: the
users' rows (FOR KEY SHARE, so that deleting a user waits for them, and they for it),
the buckets, then the periods' rows, each in user order: no deadlock.
A user with neither a quota nor a tokens-per-minute limit costs one index lookup in
`users` and takes no lock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llamaserve.config import parse_period

MAX_TOKENS = 2**63 - 1  # PostgreSQL's bigint: a larger max_tokens is as good as no bound

_RESERVE = """
WITH r AS (  -- the requests, in their order; want NULL: no bound
    SELECT user_id, want FROM unnest($1::bigint[], $2::bigint[]) AS r(user_id, want)
),
u AS (  -- the metered users, locked against deletion before their rows, in id order
    SELECT id, quota, period, tpm
    FROM users
    CROSS JOIN LATERAL (SELECT COALESCE(token_quota, $3::bigint) AS quota,
                               COALESCE(quota_period, $4::text) AS period,
                               COALESCE(token_rate_limit, $5::int) AS tpm) AS limits
    WHERE id IN (SELECT user_id FROM r) AND (quota > 0 OR tpm > 0)
    ORDER BY id
    FOR KEY SHARE OF users
),
w AS (
    SELECT u.id, p.period_start, p.period_end
    FROM u CROSS JOIN LATERAL llama_quota_period(u.period, now()) AS p
    WHERE u.quota > 0
),
b AS (  -- the buckets, refilled up to now with the capacity they had
    INSERT INTO token_rate_state AS s (user_id, level, capacity, updated_at)
    SELECT id, tpm, tpm, now() FROM u WHERE tpm > 0 ORDER BY id
    ON CONFLICT (user_id) DO UPDATE SET
        level = LEAST(excluded.capacity, s.level + s.capacity / 60.0
                      * GREATEST(0, extract(epoch FROM now() - s.updated_at))),
        capacity = excluded.capacity,
        updated_at = GREATEST(s.updated_at, now())
    RETURNING s.user_id, s.level
),
asked AS (  -- each user's requests together (numeric: a sum of huge bounds)
    SELECT user_id, CASE WHEN bool_and(want IS NOT NULL) THEN sum(want::numeric) END AS total
    FROM r GROUP BY user_id
),
q AS (  -- the period's row: reserve what the completions may use of what is left
    INSERT INTO quota_usage AS q (user_id, period_start, reserved, last_grant)
    SELECT u.id, w.period_start, g.first, g.first
    FROM u JOIN w ON w.id = u.id JOIN asked a ON a.user_id = u.id
    LEFT JOIN b ON b.user_id = u.id
    CROSS JOIN LATERAL (SELECT LEAST(COALESCE(a.total, u.quota), u.quota)::bigint AS first) AS g
    WHERE u.tpm = 0 OR b.level > 0
    ORDER BY u.id
    ON CONFLICT (user_id, period_start) DO UPDATE SET  -- excluded.last_grant: min(asked, quota)
        reserved = q.reserved + LEAST(
            excluded.last_grant, (SELECT quota FROM u WHERE id = q.user_id) - q.used - q.reserved),
        last_grant = LEAST(
            excluded.last_grant, (SELECT quota FROM u WHERE id = q.user_id) - q.used - q.reserved)
    WHERE q.used + q.reserved < (SELECT quota FROM u WHERE id = q.user_id)
    RETURNING q.user_id, q.used, q.reserved, q.last_grant
),
seen AS (  -- the period's row as this statement's snapshot saw it: for a refusal
    SELECT qu.user_id, qu.used, qu.reserved
    FROM w JOIN quota_usage qu ON qu.user_id = w.id AND qu.period_start = w.period_start
)
SELECT u.id AS user_id, u.quota, u.period, u.tpm, w.period_start, w.period_end, b.level,
       q.used, q.reserved, q.last_grant, seen.used AS seen_used,
       seen.reserved AS seen_reserved, now() AS now
FROM u
LEFT JOIN w ON w.id = u.id LEFT JOIN b ON b.user_id = u.id LEFT JOIN q ON q.user_id = u.id
LEFT JOIN seen ON seen.user_id = u.id
"""

_SETTLE = """
WITH c AS (  -- the charges, one per user and period (a user's requests summed)
    SELECT user_id, period_start, sum(granted) AS granted, sum(tokens) AS tokens
    FROM unnest($1::bigint[], $2::timestamptz[], $3::bigint[], $4::bigint[])
         AS c(user_id, period_start, granted, tokens)
    GROUP BY user_id, period_start
),
u AS MATERIALIZED (  -- the users, locked as in _RESERVE, if they have something to charge
    SELECT id FROM users
    WHERE id IN (SELECT user_id FROM c WHERE period_start IS NOT NULL)
       OR id IN (SELECT s.user_id FROM token_rate_state s JOIN c ON c.user_id = s.user_id)
    ORDER BY id
    FOR KEY SHARE
),
lb AS MATERIALIZED (  -- their buckets, locked in user order
    SELECT s.user_id FROM token_rate_state s JOIN u ON u.id = s.user_id
    ORDER BY s.user_id
    FOR UPDATE OF s
),
b AS (  -- each bucket refilled up to now, then charged its user's tokens
    UPDATE token_rate_state s SET
        level = LEAST(s.capacity, s.level + s.capacity / 60.0
                      * GREATEST(0, extract(epoch FROM now() - s.updated_at))) - t.tokens,
        updated_at = GREATEST(s.updated_at, now())
    FROM (SELECT user_id, sum(tokens) AS tokens FROM c GROUP BY user_id) t
    JOIN lb ON lb.user_id = t.user_id
    WHERE s.user_id = t.user_id
    RETURNING s.user_id
),
lq AS MATERIALIZED (  -- the periods' rows, locked in user order after every bucket
    SELECT q.user_id, q.period_start FROM quota_usage q
    JOIN c ON c.user_id = q.user_id AND c.period_start = q.period_start
    JOIN u ON u.id = q.user_id
    WHERE (SELECT count(*) FROM b) >= 0
    ORDER BY q.user_id, q.period_start
    FOR UPDATE OF q
)
UPDATE quota_usage q SET used = q.used + c.tokens, reserved = GREATEST(0, q.reserved - c.granted)
FROM c JOIN lq ON lq.user_id = c.user_id AND lq.period_start = c.period_start
WHERE q.user_id = c.user_id AND q.period_start = c.period_start
"""

_USAGE = """
SELECT u.username, l.quota AS tokens, l.period, w.period_start, w.period_end AS resets_at,
       COALESCE(qu.used, 0) AS used, COALESCE(qu.reserved, 0) AS reserved
FROM users u
CROSS JOIN LATERAL (SELECT COALESCE(u.token_quota, $1::bigint) AS quota,
                           COALESCE(u.quota_period, $2::text) AS period) AS l
CROSS JOIN LATERAL llama_quota_period(l.period, now()) AS w
LEFT JOIN quota_usage qu ON qu.user_id = u.id AND qu.period_start = w.period_start
WHERE l.quota > 0 AND ($3::text[] IS NULL OR u.username = ANY($3::text[]))
ORDER BY u.username
"""


@dataclass(frozen=True)
class Reservation:
    """An admission's verdict on a user's tokens, and what its answer's headers say."""

    allowed: bool
    reason: str | None  # when refused: "quota" or "token_rate"
    granted: int | None  # completion tokens reserved; None: the user has no quota
    period: str | None  # the quota's period (canonical: day, week, month, 21600s)
    period_start: datetime | None  # the period reserved in, for settle
    quota: int  # tokens per period; 0 = no quota
    used: int  # charged in the period
    left: int  # quota - used - reserved, after this reservation (never below 0)
    resets_at: datetime | None  # the period's end
    tpm_limit: int  # tokens per minute; 0 = no limit
    tpm_remaining: int  # the bucket's level after refill, floored (never below 0)
    tpm_reset_seconds: float  # until the bucket is full again
    retry_after: float  # when refused: until admission could pass

    @property
    def metered(self) -> bool:
        """A quota or a tokens-per-minute limit applies (settle has something to do)."""
        return self.quota > 0 or self.tpm_limit > 0


UNMETERED = Reservation(
    allowed=True, reason=None, granted=None, period=None, period_start=None, quota=0,
    used=0, left=0, resets_at=None, tpm_limit=0, tpm_remaining=0, tpm_reset_seconds=0.0,
    retry_after=0.0,
)  # fmt: skip


@dataclass(frozen=True)
class QuotaUsage:
    """A user's quota in the current period."""

    username: str
    tokens: int  # per period
    period: str  # canonical
    period_start: datetime
    resets_at: datetime
    used: int
    reserved: int  # by requests not yet charged
    left: int  # never below 0


async def reserve(
    conn: Any,
    *,
    user_id: int,
    want: int | None,
    default_quota: int,
    default_period: str,
    default_tpm: int,
) -> Reservation:
    """Admit a request of the user, or refuse it; when admitted with a quota, reserve
    min(want, left) tokens for its completion (want None: all that is left).

    The defaults apply to a user without settings of their own (NULL): 0 = none.
    A user gone meanwhile is admitted unmetered (the next request will not pass).
    """
    [reservation] = await reserve_many(
        conn, asks=[(user_id, want)], default_quota=default_quota,
        default_period=default_period, default_tpm=default_tpm,
    )  # fmt: skip
    return reservation


async def reserve_many(
    conn: Any,
    *,
    asks: Sequence[tuple[int, int | None]],
    default_quota: int,
    default_period: str,
    default_tpm: int,
) -> list[Reservation]:
    """`reserve` for several requests (user id, want) in one statement, as if one after
    another in their order: a user's requests are granted in turn what is left after
    those before them, the first that finds nothing left and those after it refused."""
    wants = [None if want is None else min(max(0, want), MAX_TOKENS) for _, want in asks]
    args = (default_quota, parse_period(default_period), default_tpm)
    rows = await conn.fetch(_RESERVE, [user for user, _ in asks], wants, *args)
    by_user = {row["user_id"]: _Period(row) for row in rows}
    return [
        by_user[user].take(want) if user in by_user else UNMETERED
        for (user, _), want in zip(asks, wants, strict=True)
    ]


@dataclass(frozen=True)
class Charge:
    """A request's real tokens (prompt and completion), to be charged to the period it
    was admitted in (None: it reserved in none), releasing what was `granted` it there."""

    user_id: int
    period_start: datetime | None
    granted: int | None
    tokens: int


async def settle(
    conn: Any, *, user_id: int, period_start: datetime | None, granted: int | None, tokens: int
) -> None:
    """Charge a request's real tokens: to the period it was admitted in (even one that has
    ended since), releasing its reservation, and to the bucket of its tokens-per-minute
    limit."""
    await settle_many(conn, [Charge(user_id, period_start, granted, tokens)])


async def settle_many(conn: Any, charges: Sequence[Charge]) -> None:
    """`settle` for several requests, of any users, in one statement: a user's charges
    summed, one update of each row. Rows are locked in the order `reserve_many` locks
    them (users, buckets, periods, each in user order): gateways never deadlock."""
    if charges:
        await conn.execute(
            _SETTLE,
            [c.user_id for c in charges],
            [c.period_start for c in charges],
            [c.granted or 0 for c in charges],
            [min(max(0, c.tokens), MAX_TOKENS) for c in charges],
        )


async def current_usage(
    conn: Any,
    *,
    default_quota: int,
    default_period: str,
    usernames: Sequence[str] | None = None,
) -> dict[str, QuotaUsage]:
    """The users with a quota (of these usernames, or all), by username: their current
    period's tokens used, reserved and left."""
    names = None if usernames is None else list(usernames)
    rows = await conn.fetch(_USAGE, default_quota, parse_period(default_period), names)
    return {
        row["username"]: QuotaUsage(
            **dict(row), left=max(0, row["tokens"] - row["used"] - row["reserved"])
        )
        for row in rows
    }


async def period_bounds(conn: Any, *, period: str, at: datetime) -> tuple[datetime, datetime]:
    """The period (start, end) holding the instant `at`, as admissions compute it."""
    row = await conn.fetchrow("SELECT * FROM llama_quota_period($1, $2)", parse_period(period), at)
    return row["period_start"], row["period_end"]


class _Period:
    """A metered user's period and bucket as one statement left them, handing out its
    grants to the user's requests in their order."""

    def __init__(self, row: Any) -> None:
        self.row = row
        self.quota, self.tpm = int(row["quota"]), int(row["tpm"])
        self.level: float = row["level"] if self.tpm else 0.0
        self.reserved_now = row["last_grant"] is not None  # the statement reserved
        if self.reserved_now:  # left before it: what it reserved in all is last_grant
            self.used = int(row["used"])
            self.left = self.quota - self.used - int(row["reserved"]) + int(row["last_grant"])
        else:
            self.used = int(row["seen_used"] or 0)
            self.left = max(0, self.quota - self.used - int(row["seen_reserved"] or 0))

    def take(self, want: int | None) -> Reservation:
        quota, tpm, level, row = self.quota, self.tpm, self.level, self.row
        rate_ok = tpm == 0 or level > 0
        granted = None
        reason, retry = None, 0.0
        if self.reserved_now and self.left > 0:
            granted = self.left if want is None else min(want, self.left)
            self.left -= granted
        elif not (quota == 0 and rate_ok):
            if quota > 0 and (rate_ok or self.left == 0):
                reason, retry = "quota", (row["period_end"] - row["now"]).total_seconds()
                self.left = 0
            else:  # until the level is back above 0
                reason, retry = "token_rate", -level * 60 / tpm
        return Reservation(
            allowed=reason is None,
            reason=reason,
            granted=None if quota == 0 else (granted or 0),
            period=row["period"] if quota > 0 else None,
            period_start=row["period_start"],
            quota=quota,
            used=self.used,
            left=self.left,
            resets_at=row["period_end"],
            tpm_limit=tpm,
            tpm_remaining=max(0, math.floor(level)),
            tpm_reset_seconds=max(0.0, (tpm - level) * 60 / tpm) if tpm else 0.0,
            retry_after=max(0.0, retry),
        )
