"""The per-user cap across gateways, in one gateway's `Leases`, on a real database: a
lease that ends elsewhere while this gateway's take of one is failing is not missed."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import pytest

from llamaserve.gateway.leases import Leases
from llamaserve.gateway.scheduling import EngineState, QueueLimits, Scheduler
from llamaserve.store import db, generating, users
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio


async def test_a_lease_ending_while_a_take_fails_does_not_hold_the_user(
    pg_database: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other gateway's lease ends, and its announcement comes, between this gateway's
    refused take and its holding the user back: before, the user was held until the
    next retry (1 s), with their slot idle (a helper measured 0.98 s across gateways)."""
    pool = await db.create_pool(pg_database.settings, pg_database.layout)
    leases = Leases(pool, cap=1, scheduler=Scheduler([EngineState("e", capacity=2)], QueueLimits()))
    try:
        async with pool.acquire() as conn:
            user = int((await users.create_user(conn, username="racer")).id)
        await leases.start()
        await asyncio.sleep(0.3)  # its listener is in place
        elsewhere, theirs = uuid4(), uuid4()
        await generating.alive(pool, elsewhere)
        assert await generating.take(pool, lease=theirs, user_id=user, gateway=elsewhere, cap=1)

        take = generating.take
        heard = leases.heard(user)

        async def refused_as_theirs_ends(*args: Any, **kwargs: Any) -> bool:
            taken = await take(*args, **kwargs)  # refused: the other gateway's lease is held
            await generating.release(pool, [theirs])  # which ends now, announced
            for _ in range(200):
                if leases.heard(user) != heard:
                    break
                await asyncio.sleep(0.01)
            return taken

        monkeypatch.setattr(generating, "take", refused_as_theirs_ends)
        assert await leases.take(user) is None
        assert leases.heard(user) == heard + 1  # the announcement came meanwhile
        assert leases.hold(user, since=heard) is False  # so the user is not held back
        monkeypatch.undo()
        assert await leases.take(user) is not None  # and the next take succeeds
    finally:
        await leases.close()
        await pool.close()
