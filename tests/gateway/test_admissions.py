"""The gateway's admissions in batches, on a real database: requests that come together
share round trips, a client that leaves drops only its own answer, and a failed round
trip fails each of its requests (none waits forever)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from llamaserve.errors import ServiceUnavailable
from llamaserve.gateway.admission import Admissions
from llamaserve.store import db, users
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio


class CountingPool:
    """The real pool, counting the statements sent through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements = 0
        self.events: list[str] = []  # "database" when a statement is sent, among others

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.statements += 1
        self.events.append("database")
        return await self.pool.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        self.statements += 1
        self.events.append("database")
        return await self.pool.execute(sql, *args)


@pytest.fixture
async def pool(pg_database: PgDatabase) -> AsyncIterator[CountingPool]:
    real = await db.create_pool(pg_database.settings, pg_database.layout, durable_commits=False)
    try:
        yield CountingPool(real)
    finally:
        await real.close()


async def key_of(pool: CountingPool, username: str, rate_limit: int) -> str:
    async with pool.pool.acquire() as conn:
        await users.create_user(
            conn, username=username, rate_limit=rate_limit, rate_window_seconds=600
        )
        return (await users.create_key(conn, username=username)).key_id


async def test_requests_that_come_together_share_round_trips(pool: CountingPool) -> None:
    key = await key_of(pool, "alice", rate_limit=30)
    admissions = Admissions(pool, default_limit=60, default_window=60)
    await admissions.admit(key)  # the first request ever makes the bucket
    pool.statements = 0

    answers = await asyncio.gather(*(admissions.admit(key) for _ in range(50)))
    found = [a.admission for a in answers if a is not None]

    assert sum(a.allowed for a in found) == 29
    # All 50 are waiting before the round trip starts: one statement takes them all.
    assert pool.statements == 1
    assert sorted(a.remaining for a in found if a.allowed) == list(range(29))


async def test_a_lone_request_is_sent_at_once(pool: CountingPool) -> None:
    key = await key_of(pool, "bob", rate_limit=10)
    admissions = Admissions(pool, default_limit=60, default_window=60)
    for expected in range(9, 4, -1):
        admitted = await admissions.admit(key)
        assert admitted is not None and admitted.admission.remaining == expected
    assert await admissions.admit("lsk_no_such_key") is None


async def test_the_round_trip_starts_after_the_work_of_its_turn(pool: CountingPool) -> None:
    """A request expected to pass is sent to its engine in a task made after its
    admission was submitted (`Exchange._forward`); that task's first step, which writes
    the request to the engine, comes before the database round trip, not after it."""
    key = await key_of(pool, "bob", rate_limit=100)
    admissions = Admissions(pool, default_limit=60, default_window=60)
    await admissions.admit(key)
    pool.events.clear()

    async def relay() -> None:
        pool.events.append("relay")

    pending = admissions.submit(key)
    assert pending.expected is not None
    sent = asyncio.ensure_future(relay())
    await asyncio.gather(pending.future, sent)

    assert pool.events == ["relay", "database"]


async def test_a_client_that_leaves_drops_only_its_own_answer(pool: CountingPool) -> None:
    key = await key_of(pool, "carol", rate_limit=100)
    admissions = Admissions(pool, default_limit=60, default_window=60)
    waiting = [asyncio.ensure_future(admissions.admit(key)) for _ in range(20)]
    await asyncio.sleep(0)  # all are queued
    for task in waiting[::2]:
        task.cancel()
    done = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)

    kept = done[1::2]
    assert all(
        not isinstance(a, BaseException) and a is not None and a.admission.allowed for a in kept
    )
    assert all(isinstance(a, asyncio.CancelledError) for a in done[::2])
    # Later requests are admitted as usual.
    assert (await admissions.admit(key)) is not None


async def test_a_failed_round_trip_fails_each_of_its_requests(pg_database: PgDatabase) -> None:
    real = await db.create_pool(pg_database.settings, pg_database.layout)
    await real.close()  # every statement now fails
    admissions = Admissions(real, default_limit=60, default_window=60)

    found = await asyncio.wait_for(
        asyncio.gather(*(admissions.admit("lsk_any") for _ in range(5)), return_exceptions=True),
        timeout=10,
    )

    assert all(isinstance(f, ServiceUnavailable) for f in found)
    assert {f.code for f in found if isinstance(f, ServiceUnavailable)} == {"database_unavailable"}


async def test_a_request_is_expected_to_pass_only_with_tokens_to_spare(
    pool: CountingPool,
) -> None:
    key = await key_of(pool, "dave", rate_limit=20)  # a tenth of the limit: 2 to spare
    async with pool.pool.acquire() as conn:
        other = (await users.create_key(conn, username="dave")).key_id
    admissions = Admissions(pool, default_limit=60, default_window=60)
    first = admissions.submit(key)
    assert first.expected is None  # a key not seen yet: wait for the database
    await first.future
    for _ in range(15):
        await admissions.admit(key)  # 4 tokens left

    pending = [admissions.submit(other)] + [admissions.submit(key) for _ in range(3)]

    # 4 left, minus those under way (the other key's counts: its user is not known yet),
    # must leave 2 to spare: the last waits for the database.
    assert [p.expected is not None for p in pending] == [False, True, True, False]
    assert pending[1].expected is not None and pending[1].expected.username == "dave"
    found = [await p.future for p in pending]
    assert [a is not None and a.admission.allowed for a in found] == [True] * 4
    later = [admissions.submit(key), admissions.submit("lsk_no_such_key")]
    assert [p.expected for p in later] == [None, None]  # none left; an unknown key
    refused, unknown = [await p.future for p in later]
    assert refused is not None and not refused.admission.allowed and unknown is None


async def test_after_a_failed_round_trip_every_request_waits_for_the_database(
    pg_database: PgDatabase,
) -> None:
    real = await db.create_pool(pg_database.settings, pg_database.layout)
    counting = CountingPool(real)
    key = await key_of(counting, "erin", rate_limit=100)
    admissions = Admissions(real, default_limit=60, default_window=60)
    await admissions.admit(key)
    before = admissions.submit(key)
    assert before.expected is not None
    await before.future
    await real.close()  # every statement now fails

    with pytest.raises(ServiceUnavailable):
        await admissions.admit(key)

    after = admissions.submit(key)
    assert after.expected is None
    with pytest.raises(ServiceUnavailable):
        await after.future
