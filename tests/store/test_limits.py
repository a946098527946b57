"""Admission in the store: a batch of requests is admitted exactly as if one by one, keys
of one user share its bucket, refused keys take no token, and batches of concurrent
gateways (connections) stay exact and never deadlock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from llamaserve.store import limits, users
from llamaserve.store.limits import Admission
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio

DEFAULTS = {"default_limit": 60, "default_window": 60}


async def new_key(
    conn: asyncpg.Connection,
    username: str,
    rate_limit: int | None = None,
    rate_window_seconds: int | None = None,
) -> str:
    """A new key of the user, who is created (with these limits) if need be."""
    if await users.get_user(conn, username=username) is None:
        await users.create_user(
            conn, username=username, rate_limit=rate_limit, rate_window_seconds=rate_window_seconds
        )
    return (await users.create_key(conn, username=username)).key_id


async def admit(conn: asyncpg.Connection, key_ids: list[str]) -> list[Admission | None]:
    return await limits.admit(conn, key_ids=key_ids, **DEFAULTS)


def allowed(admissions: list[Admission | None]) -> list[bool]:
    return [a is not None and a.allowed for a in admissions]


async def test_a_batch_is_admitted_as_if_one_by_one(pg_conn: asyncpg.Connection) -> None:
    batched = await new_key(pg_conn, "batched", rate_limit=5, rate_window_seconds=600)
    single = await new_key(pg_conn, "single", rate_limit=5, rate_window_seconds=600)

    in_one = await admit(pg_conn, [batched] * 8)
    one_by_one = [(await admit(pg_conn, [single]))[0] for _ in range(8)]

    assert allowed(in_one) == allowed(one_by_one) == [True] * 5 + [False] * 3
    for a, b in zip(in_one, one_by_one, strict=True):
        assert a is not None and b is not None
        assert (a.limit, a.window, a.remaining) == (b.limit, b.window, b.remaining)
        assert a.reset_seconds == pytest.approx(b.reset_seconds, abs=1)
        assert a.retry_after == pytest.approx(b.retry_after, abs=1)
    assert [a.remaining for a in in_one if a] == [4, 3, 2, 1, 0, 0, 0, 0]
    refused = in_one[-1]
    assert refused is not None and 119 < refused.retry_after <= 120  # one step: 600 s / 5


async def test_the_keys_of_one_user_share_its_bucket_in_order(
    pg_conn: asyncpg.Connection,
) -> None:
    first = await new_key(pg_conn, "alice", rate_limit=3, rate_window_seconds=600)
    second = await new_key(pg_conn, "alice")
    other = await new_key(pg_conn, "bob", rate_limit=1, rate_window_seconds=600)

    admissions = await admit(pg_conn, [first, other, second, first, other, second, first])

    assert allowed(admissions) == [True, True, True, True, False, False, False]
    names = [a.username for a in admissions if a]
    assert names == ["alice", "bob", "alice", "alice", "bob", "alice", "alice"]


async def test_refused_and_unlimited_keys_take_no_token(pg_conn: asyncpg.Connection) -> None:
    limited = await new_key(pg_conn, "limited", rate_limit=2, rate_window_seconds=600)
    revoked = await new_key(pg_conn, "limited")
    await users.revoke_key(pg_conn, key_id=revoked)
    expired = await new_key(pg_conn, "limited")
    await pg_conn.execute(
        "UPDATE api_keys SET expires_at = $1 WHERE key_id = $2",
        datetime.now(UTC) - timedelta(seconds=1),
        expired,
    )
    disabled = await new_key(pg_conn, "disabled", rate_limit=2, rate_window_seconds=600)
    await users.set_enabled(pg_conn, username="disabled", enabled=False)
    unlimited = await new_key(pg_conn, "unlimited", rate_limit=0)

    admissions = await admit(
        pg_conn,
        [revoked, expired, "lsk_unknown", disabled, unlimited, limited, unlimited, limited],
    )

    states = [a.state if a else None for a in admissions]
    assert states == ["revoked", "expired", None, "disabled", "ok", "ok", "ok", "ok"]
    assert allowed(admissions) == [False, False, False, False, True, True, True, True]
    unlimited_admission = admissions[4]
    assert unlimited_admission is not None and unlimited_admission.limit == 0
    assert [a.remaining for a in admissions[5::2] if a] == [1, 0]
    # No bucket was made for the unlimited or the disabled user.
    buckets = await pg_conn.fetchval("SELECT count(*) FROM rate_limit_state")
    assert buckets == 1


async def test_a_refill_admits_again(pg_conn: asyncpg.Connection) -> None:
    key = await new_key(pg_conn, "refill", rate_limit=2, rate_window_seconds=1)
    assert allowed(await admit(pg_conn, [key] * 3)) == [True, True, False]
    await asyncio.sleep(0.6)  # one step is 0.5 s
    assert allowed(await admit(pg_conn, [key] * 2)) == [True, False]


async def test_concurrent_batches_are_exact_and_never_deadlock(
    pg_database: PgDatabase,
) -> None:
    setup = await pg_database.connect()
    try:
        a = await new_key(setup, "a", rate_limit=40, rate_window_seconds=600)
        b = await new_key(setup, "b", rate_limit=40, rate_window_seconds=600)
    finally:
        await setup.close()
    connections = [await pg_database.connect() for _ in range(4)]

    async def rounds(conn: asyncpg.Connection, batch: list[str]) -> list[Admission | None]:
        found = []
        for _ in range(10):
            found += await admit(conn, batch)
        return found

    # Half the connections name user a first, half user b; rows are locked in user
    # order whatever a batch's order, so that no two batches wait for each other.
    try:
        results = await asyncio.gather(
            *(
                rounds(conn, [a, b] * 2 if i % 2 else [b, a] * 2)
                for i, conn in enumerate(connections)
            )
        )
    finally:
        for conn in connections:
            await conn.close()
    admissions = [x for found in results for x in found]
    for username in ("a", "b"):
        of_user = [x for x in admissions if x is not None and x.username == username]
        assert len(of_user) == 80
        assert sum(x.allowed for x in of_user) == 40
