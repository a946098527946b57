"""Token quotas and the tokens-per-minute limit in the store: the arithmetic of reserve and
settle, calendar and span periods by the database's clock, exactness under concurrent
admissions (as of many gateways), the token bucket's debt and refill, and cascades."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from llamaserve.store import db, quotas, users
from llamaserve.store.errors import InvalidValue
from llamaserve.store.quotas import Reservation
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio


async def new_user(
    conn: asyncpg.Connection,
    username: str,
    *,
    quota: int | None = None,
    per: str | None = None,
    tpm: int | None = None,
) -> int:
    await users.create_user(conn, username=username)
    if quota is not None:
        await users.set_quota(conn, username=username, token_quota=quota, period=per)
    if tpm is not None:
        await users.set_token_rate_limit(conn, username=username, token_rate_limit=tpm)
    found = await users.get_user(conn, username=username)
    assert found is not None
    return found.id


async def reserve(
    conn: asyncpg.Connection,
    user_id: int,
    want: int | None,
    *,
    default_quota: int = 0,
    default_period: str = "day",
    default_tpm: int = 0,
) -> Reservation:
    return await quotas.reserve(
        conn,
        user_id=user_id,
        want=want,
        default_quota=default_quota,
        default_period=default_period,
        default_tpm=default_tpm,
    )


async def settle(conn: asyncpg.Connection, user_id: int, r: Reservation, tokens: int) -> None:
    await quotas.settle(
        conn, user_id=user_id, period_start=r.period_start, granted=r.granted, tokens=tokens
    )


async def row(conn: asyncpg.Connection, user_id: int) -> tuple[int, int] | None:
    found = await conn.fetchrow(
        "SELECT used, reserved FROM quota_usage WHERE user_id = $1 ORDER BY period_start DESC",
        user_id,
    )
    return None if found is None else (found["used"], found["reserved"])


async def test_reserve_and_settle_add_up(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=1000, per="day")

    first = await reserve(pg_conn, alice, 300)
    assert (first.allowed, first.reason, first.granted) == (True, None, 300)
    assert (first.quota, first.period, first.used, first.left) == (1000, "day", 0, 700)
    assert first.metered and first.tpm_limit == 0
    second = await reserve(pg_conn, alice, 200)
    assert (second.granted, second.left) == (200, 500)
    assert await row(pg_conn, alice) == (0, 500)

    await settle(pg_conn, alice, first, 40 + 250)  # prompt and completion
    assert await row(pg_conn, alice) == (290, 200)
    third = await reserve(pg_conn, alice, 100)
    assert (third.used, third.left) == (290, 1000 - 290 - 200 - 100)
    await settle(pg_conn, alice, second, 10)
    await settle(pg_conn, alice, third, 100)
    assert await row(pg_conn, alice) == (400, 0)


async def test_granted_is_bounded_by_what_is_left(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=1000, per="day")
    assert (await reserve(pg_conn, alice, 5000)).granted == 1000  # the first of a period
    r = await reserve(pg_conn, alice, 1)
    assert (r.allowed, r.reason, r.left) == (False, "quota", 0)
    await pg_conn.execute("UPDATE quota_usage SET reserved = 600")
    r = await reserve(pg_conn, alice, 5000)
    assert (r.allowed, r.granted, r.left) == (True, 400, 0)
    await pg_conn.execute("UPDATE quota_usage SET reserved = 0, used = 250")
    r = await reserve(pg_conn, alice, None)  # no max_tokens: all that is left
    assert (r.granted, r.used, r.left) == (750, 250, 0)
    await pg_conn.execute("UPDATE quota_usage SET reserved = 0")
    r = await reserve(pg_conn, alice, 0)  # nothing to generate: admitted, nothing held
    assert (r.allowed, r.granted, r.left) == (True, 0, 750)
    r = await reserve(pg_conn, alice, 10**30)  # beyond any column: as good as no bound
    assert (r.allowed, r.granted, r.left) == (True, 750, 0)


async def test_a_batch_is_reserved_as_if_one_by_one(pg_conn: asyncpg.Connection) -> None:
    """`reserve_many` (one statement for a batch of admissions) grants and refuses what
    `reserve` one request at a time would, to twin users in the same state."""
    wants: list[int | None] = [300, 0, 500, 400, None, 10]
    twins = []
    for suffix in ("batch", "single"):
        twins.append((
            await new_user(pg_conn, f"q-{suffix}", quota=1000, per="day"),
            await new_user(pg_conn, f"open-{suffix}"),  # unmetered
            await new_user(pg_conn, f"tpm-{suffix}", tpm=50),
            await new_user(pg_conn, f"both-{suffix}", quota=600, per="day", tpm=10**6),
        ))  # fmt: skip

    def asks(users: tuple[int, ...]) -> list[tuple[int, int | None]]:
        return [(user, want) for want in wants for user in users]

    batch = await quotas.reserve_many(
        pg_conn, asks=asks(twins[0]), default_quota=0, default_period="day", default_tpm=0
    )
    single = [await reserve(pg_conn, user, want) for user, want in asks(twins[1])]

    def seen(r: Reservation) -> tuple[object, ...]:
        return (r.allowed, r.reason, r.granted, r.used, r.left, r.quota, r.tpm_limit)

    assert [seen(r) for r in batch] == [seen(r) for r in single]
    quota_user = [seen(r)[:5] for r in batch[:: len(twins[0])]]
    assert quota_user == [
        (True, None, 300, 0, 700), (True, None, 0, 0, 700), (True, None, 500, 0, 200),
        (True, None, 200, 0, 0), (False, "quota", 0, 0, 0), (False, "quota", 0, 0, 0),
    ]  # fmt: skip
    for batched, alone in zip(twins[0], twins[1], strict=True):
        assert await row(pg_conn, batched) == await row(pg_conn, alone)


async def test_a_used_up_quota_refuses_until_the_period_ends(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=100, per="day")
    r = await reserve(pg_conn, alice, 100)
    await settle(pg_conn, alice, r, 130)  # its prompt went over
    refused = await reserve(pg_conn, alice, 10)
    now = await pg_conn.fetchval("SELECT now()")
    start = datetime(now.year, now.month, now.day, tzinfo=UTC)
    assert (refused.allowed, refused.reason, refused.granted) == (False, "quota", 0)
    assert (refused.used, refused.left) == (130, 0)
    assert (refused.period_start, refused.resets_at) == (start, start + timedelta(days=1))
    assert refused.retry_after == pytest.approx((refused.resets_at - now).total_seconds(), abs=1)
    assert await row(pg_conn, alice) == (130, 0)  # a refusal holds nothing


async def test_defaults_and_overrides(pg_conn: asyncpg.Connection) -> None:
    default = await new_user(pg_conn, "default")
    none = await new_user(pg_conn, "none", quota=0, tpm=0)
    own = await new_user(pg_conn, "own", quota=50, per="6h", tpm=1000)
    defaults = {"default_quota": 500, "default_period": "week", "default_tpm": 600}

    r = await reserve(pg_conn, default, 10, **defaults)
    assert (r.quota, r.period, r.tpm_limit, r.granted) == (500, "week", 600, 10)
    assert r.period_start is not None and r.period_start.weekday() == 0  # Monday
    assert await reserve(pg_conn, none, 10, **defaults) == quotas.UNMETERED
    r = await reserve(pg_conn, own, 100, **defaults)
    assert (r.quota, r.period, r.tpm_limit, r.granted) == (50, "21600s", 1000, 50)
    assert r.resets_at is not None and r.resets_at.hour % 6 == 0
    # A default period may be written as the operator writes it.
    assert (await reserve(pg_conn, default, 1, default_period="6h", default_quota=5)).period == (
        "21600s"
    )


async def test_a_user_with_neither_is_admitted_without_a_write(
    pg_conn: asyncpg.Connection,
) -> None:
    alice = await new_user(pg_conn, "alice")
    r = await reserve(pg_conn, alice, 100)
    assert r == quotas.UNMETERED and r.allowed and not r.metered
    await settle(pg_conn, alice, r, 500)
    assert await pg_conn.fetchval("SELECT count(*) FROM quota_usage") == 0
    assert await pg_conn.fetchval("SELECT count(*) FROM token_rate_state") == 0
    # Not even a row lock (a lock would have written the row's xmax).
    locker = await pg_conn.fetchval("SELECT xmax::text FROM users WHERE id = $1", alice)
    assert locker == "0"


@pytest.mark.parametrize(
    ("period", "at", "start", "end"),
    [
        ("day", "2024-02-29 23:30:00+00", "2024-02-29 00:00:00+00", "2024-03-01 00:00:00+00"),
        ("week", "2024-02-29 23:30:00+00", "2024-02-26 00:00:00+00", "2024-03-04 00:00:00+00"),
        ("week", "2024-03-04 00:00:00+00", "2024-03-04 00:00:00+00", "2024-03-11 00:00:00+00"),
        ("week", "2024-12-31 12:00:00+00", "2024-12-30 00:00:00+00", "2025-01-06 00:00:00+00"),
        ("month", "2024-02-29 23:30:00+00", "2024-02-01 00:00:00+00", "2024-03-01 00:00:00+00"),
        ("month", "2024-12-31 23:59:59+00", "2024-12-01 00:00:00+00", "2025-01-01 00:00:00+00"),
        # The day of the US change to summer time: still whole UTC days.
        ("day", "2024-03-10 07:15:00+00", "2024-03-10 00:00:00+00", "2024-03-11 00:00:00+00"),
        # Just before midnight in New York is the next day in UTC.
        ("day", "2024-03-10 23:30:00-04", "2024-03-11 00:00:00+00", "2024-03-12 00:00:00+00"),
        ("6h", "2024-03-10 07:15:00+00", "2024-03-10 06:00:00+00", "2024-03-10 12:00:00+00"),
        ("6h", "2024-03-10 23:59:59+00", "2024-03-10 18:00:00+00", "2024-03-11 00:00:00+00"),
        ("30m", "2024-03-10 07:45:00+00", "2024-03-10 07:30:00+00", "2024-03-10 08:00:00+00"),
        # Two-day windows from the epoch: 1970-01-01, -03, ... (2024-03-10 is day 19792).
        ("2d", "2024-03-11 07:15:00+00", "2024-03-10 00:00:00+00", "2024-03-12 00:00:00+00"),
    ],
)
async def test_period_bounds_in_utc(
    pg_conn: asyncpg.Connection, period: str, at: str, start: str, end: str
) -> None:
    # The session's time zone changes nothing: periods are UTC's.
    await pg_conn.execute("SET TimeZone = 'America/New_York'")
    bounds = await quotas.period_bounds(pg_conn, period=period, at=datetime.fromisoformat(at))
    assert bounds == (datetime.fromisoformat(start), datetime.fromisoformat(end))


async def test_an_unknown_period_is_refused(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice")
    with pytest.raises(ValueError, match="invalid period 'year'"):
        await reserve(pg_conn, alice, 1, default_quota=10, default_period="year")
    with pytest.raises(InvalidValue, match="invalid period '0h'"):
        await users.set_quota(pg_conn, username="alice", token_quota=10, period="0h")
    with pytest.raises(InvalidValue, match="needs a period"):
        await users.set_quota(pg_conn, username="alice", token_quota=10, period=None)
    with pytest.raises(asyncpg.CheckViolationError):  # the database holds canonical ones only
        await pg_conn.execute("UPDATE users SET quota_period = '6h'")


async def test_a_span_period_renews(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=100, per="2s")
    first = await reserve(pg_conn, alice, 100)
    await settle(pg_conn, alice, first, 100)
    refused = await reserve(pg_conn, alice, 1)
    if refused.allowed:  # the window turned between the two: the next one is whole
        pytest.skip("the 2 s window turned mid-test")
    assert refused.reason == "quota" and refused.resets_at is not None
    assert first.resets_at is not None and first.period_start is not None
    assert first.resets_at - first.period_start == timedelta(seconds=2)
    assert first.period_start.timestamp() % 2 == 0  # aligned on the epoch
    await asyncio.sleep(refused.retry_after + 0.05)
    renewed = await reserve(pg_conn, alice, 100)
    assert (renewed.allowed, renewed.granted, renewed.used) == (True, 100, 0)
    assert renewed.period_start == first.resets_at


async def test_settle_charges_the_period_of_admission(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=100, per="1s")
    r = await reserve(pg_conn, alice, 60)
    assert r.resets_at is not None
    await asyncio.sleep(max(0.0, (r.resets_at - datetime.now(UTC)).total_seconds()) + 0.2)
    await settle(pg_conn, alice, r, 75)  # ends in the next window
    rows = await pg_conn.fetch("SELECT period_start, used, reserved FROM quota_usage")
    assert [tuple(x) for x in rows] == [(r.period_start, 75, 0)]


async def test_concurrent_reservations_are_exact(pg_database: PgDatabase) -> None:
    pool = await db.create_pool(pg_database.settings, pg_database.layout, max_size=20)
    try:
        async with pool.acquire() as conn:
            alice = await new_user(conn, "alice", quota=1000, per="day")

        async def one() -> Reservation:
            async with pool.acquire() as conn:
                return await reserve(conn, alice, 100)

        # The first request of the period among them: the row is made by one of them.
        got = await asyncio.gather(*(one() for _ in range(50)))
        granted = [r.granted for r in got if r.allowed]
        assert len(granted) == 10 and sum(g or 0 for g in granted) == 1000
        assert all(r.reason == "quota" for r in got if not r.allowed)
        async with pool.acquire() as conn:
            assert await row(conn, alice) == (0, 1000)
    finally:
        await pool.close()


async def test_uneven_concurrent_reservations_never_exceed_the_quota(
    pg_database: PgDatabase,
) -> None:
    """Admissions and charges of one user at once, on many connections, with a token rate
    limit too: every charge counted, completions within the quota, and no deadlock."""
    pool = await db.create_pool(pg_database.settings, pg_database.layout, max_size=20)
    try:
        async with pool.acquire() as conn:
            alice = await new_user(conn, "alice", quota=10_000, per="day", tpm=10**9)

        async def request(want: int) -> Reservation:
            async with pool.acquire() as conn:
                r = await reserve(conn, alice, want)
            if r.allowed:
                async with pool.acquire() as conn:
                    await settle(conn, alice, r, 10 + (r.granted or 0) // 2)
            return r

        got = await asyncio.gather(*(request(37 * (i % 13) + 1) for i in range(200)))
        async with pool.acquire() as conn:
            used, reserved = await row(conn, alice) or (0, 0)
        admitted = [r for r in got if r.allowed]
        assert 0 < len(admitted) < len(got)  # the quota ran out
        assert all(r.reason == "quota" for r in got if not r.allowed)
        assert reserved == 0
        assert used == sum(10 + (r.granted or 0) // 2 for r in admitted)
        # Each completion fits in what was left when it was admitted: only prompts overshoot.
        assert sum((r.granted or 0) // 2 for r in admitted) <= 10_000
    finally:
        await pool.close()


async def test_the_token_bucket_goes_into_debt_and_refills(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", tpm=600)  # 10 tokens a second

    first = await reserve(pg_conn, alice, 1000)
    assert (first.allowed, first.granted, first.quota) == (True, None, 0)
    assert (first.tpm_limit, first.tpm_remaining) == (600, 600)
    assert first.tpm_reset_seconds == pytest.approx(0, abs=0.1)
    await settle(pg_conn, alice, first, 200)
    r = await reserve(pg_conn, alice, 1000)
    assert r.allowed and 400 <= r.tpm_remaining <= 401
    assert r.tpm_reset_seconds == pytest.approx(20, abs=0.5)  # 200 tokens at 10 a second
    await settle(pg_conn, alice, r, 410)  # more than was left: about 10 tokens of debt

    refused = await reserve(pg_conn, alice, 10)
    assert (refused.allowed, refused.reason, refused.tpm_remaining) == (False, "token_rate", 0)
    assert 0 < refused.retry_after <= 1.05  # until the level is back above 0
    assert refused.tpm_reset_seconds == pytest.approx(61, abs=0.5)
    await asyncio.sleep(refused.retry_after + 0.1)
    again = await reserve(pg_conn, alice, 10)
    assert again.allowed and 0 <= again.tpm_remaining <= 2


async def test_a_refused_rate_takes_nothing_from_the_quota(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=1000, per="day", tpm=60)
    r = await reserve(pg_conn, alice, 100)
    await settle(pg_conn, alice, r, 100)  # the bucket: 60 - 100 = -40
    refused = await reserve(pg_conn, alice, 100)
    assert (refused.allowed, refused.reason, refused.left) == (False, "token_rate", 900)
    assert refused.retry_after == pytest.approx(40, abs=0.5)
    assert await row(pg_conn, alice) == (100, 0)


async def test_a_lowered_limit_caps_the_bucket(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", tpm=6000)
    assert (await reserve(pg_conn, alice, 1)).tpm_remaining == 6000
    await users.set_token_rate_limit(pg_conn, username="alice", token_rate_limit=60)
    r = await reserve(pg_conn, alice, 1)
    assert (r.tpm_limit, r.tpm_remaining) == (60, 60)


async def test_current_usage(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=1000, per="week")
    await new_user(pg_conn, "bob")
    await new_user(pg_conn, "carol", quota=0)
    r = await reserve(pg_conn, alice, 300)
    await settle(pg_conn, alice, r, 100)
    await reserve(pg_conn, alice, 50)

    found = await quotas.current_usage(pg_conn, default_quota=0, default_period="day")
    assert set(found) == {"alice"}
    usage = found["alice"]
    assert (usage.tokens, usage.period, usage.used, usage.reserved, usage.left) == (
        1000, "week", 100, 50, 850,
    )  # fmt: skip
    assert usage.period_start == r.period_start and usage.resets_at == r.resets_at
    found = await quotas.current_usage(
        pg_conn, default_quota=10, default_period="month", usernames=["bob", "carol"]
    )
    assert list(found) == ["bob"] and (found["bob"].used, found["bob"].left) == (0, 10)


async def test_deleting_a_user_deletes_its_quota_and_bucket(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice", quota=1000, per="day", tpm=600)
    bob = await new_user(pg_conn, "bob", quota=1000, per="day", tpm=600)
    for user_id in (alice, bob):
        await reserve(pg_conn, user_id, 10)
    await users.delete_user(pg_conn, username="alice")
    for table in ("quota_usage", "token_rate_state"):
        ids = await pg_conn.fetch(f"SELECT user_id FROM {table}")
        assert [x["user_id"] for x in ids] == [bob]
    assert await reserve(pg_conn, alice, 10) == quotas.UNMETERED  # gone: nothing to meter


async def test_deleting_a_user_during_its_requests_never_deadlocks(
    pg_database: PgDatabase,
) -> None:
    pool = await db.create_pool(pg_database.settings, pg_database.layout, max_size=20)
    try:
        async with pool.acquire() as conn:
            alice = await new_user(conn, "alice", quota=10**9, per="1s", tpm=10**9)

        async def request() -> None:
            async with pool.acquire() as conn:
                r = await reserve(conn, alice, 10)
                await settle(conn, alice, r, 20)

        async def delete() -> None:
            await asyncio.sleep(0.05)
            async with pool.acquire() as conn:
                await users.delete_user(conn, username="alice")

        tasks = [request() for _ in range(300)]
        await asyncio.gather(*tasks[:150], delete(), *tasks[150:])  # raises on a deadlock
        async with pool.acquire() as conn:
            for table in ("quota_usage", "token_rate_state"):
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
    finally:
        await pool.close()


async def test_one_statement_charges_many_users_and_periods(pg_conn: asyncpg.Connection) -> None:
    """A batch of charges: each user's requests summed into their period and their bucket;
    a request of an ended period charged there; one without a period only to its bucket."""
    alice = await new_user(pg_conn, "alice", quota=1000, per="day", tpm=600)
    bob = await new_user(pg_conn, "bob", quota=500, per="week")
    carol = await new_user(pg_conn, "carol", tpm=600)
    a1, a2 = await reserve(pg_conn, alice, 100), await reserve(pg_conn, alice, 200)
    b1, c1 = await reserve(pg_conn, bob, 50), await reserve(pg_conn, carol, 10)
    assert c1.period_start is None and a1.period_start is not None
    yesterday = a1.period_start - timedelta(days=1)
    await pg_conn.execute(
        "INSERT INTO quota_usage (user_id, period_start, used, reserved) VALUES ($1, $2, 7, 40)",
        alice, yesterday,
    )  # fmt: skip
    Charge = quotas.Charge
    await quotas.settle_many(pg_conn, [
        Charge(alice, a1.period_start, a1.granted, 60),
        Charge(bob, b1.period_start, b1.granted, 30),
        Charge(alice, yesterday, 40, 25),
        Charge(carol, None, None, 90),
        Charge(alice, a2.period_start, a2.granted, 150),
    ])  # fmt: skip
    periods = await pg_conn.fetch(
        "SELECT user_id, period_start, used, reserved FROM quota_usage ORDER BY 1, 2"
    )
    assert [tuple(p) for p in periods] == [
        (alice, yesterday, 7 + 25, 0), (alice, a1.period_start, 210, 0),
        (bob, b1.period_start, 30, 0),
    ]  # fmt: skip
    levels = dict(await pg_conn.fetch("SELECT user_id, level FROM token_rate_state"))
    assert levels[alice] == pytest.approx(600 - 235, abs=1)
    assert levels[carol] == pytest.approx(600 - 90, abs=1)


async def test_batches_of_many_users_at_once_never_deadlock(pg_database: PgDatabase) -> None:
    """As many gateways do: reservations and batched charges of the same users in opposite
    orders, on many connections at once; every token charged, nothing left reserved. (With
    the charges' locks taken in the other order, this deadlocked.)"""
    pool = await db.create_pool(pg_database.settings, pg_database.layout, max_size=20)
    try:
        async with pool.acquire() as conn:
            ids = [await new_user(conn, f"u{i}", quota=10**9, per="day", tpm=10**9)
                   for i in range(6)]  # fmt: skip

        async def gateway(order: list[int]) -> int:
            charged = 0
            for _ in range(20):
                async with pool.acquire() as conn:
                    made = await quotas.reserve_many(
                        conn, asks=[(user, 10) for user in order],
                        default_quota=0, default_period="day", default_tpm=0,
                    )  # fmt: skip
                async with pool.acquire() as conn:
                    await quotas.settle_many(conn, [
                        quotas.Charge(user, r.period_start, r.granted, 3)
                        for user, r in zip(order, made, strict=True)
                    ])  # fmt: skip
                charged += 3 * len(order)
            return charged

        orders = [ids, ids[::-1], ids[::2] + ids[1::2], ids[1::2][::-1] + ids[::2]] * 4
        charged = await asyncio.gather(*(gateway(order) for order in orders))  # no deadlock
        async with pool.acquire() as conn:
            used, reserved = await conn.fetchrow("SELECT sum(used), sum(reserved) FROM quota_usage")
        assert (used, reserved) == (sum(charged), 0)
    finally:
        await pool.close()
