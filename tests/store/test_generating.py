"""Leases of the per-user cap on requests generating, in the store: exact under
concurrent takers (as of gateways), given back with an announcement, and dropped with
the gateway that held them once it is gone."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import asyncpg
import pytest

from llamaserve.store import generating, users
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio


async def new_user(conn: asyncpg.Connection, username: str) -> int:
    user = await users.create_user(conn, username=username)
    return int(user.id)


async def take(conn: asyncpg.Connection, user_id: int, gateway: UUID, cap: int) -> UUID | None:
    lease = uuid4()
    taken = await generating.take(conn, lease=lease, user_id=user_id, gateway=gateway, cap=cap)
    return lease if taken else None


async def held(conn: asyncpg.Connection, user_id: int) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM llama_generating WHERE user_id = $1", user_id
    )
    return count


async def announcements(conn: asyncpg.Connection) -> asyncio.Queue[str]:
    heard: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(generating.FREED, lambda *args: heard.put_nowait(args[3]))
    return heard


async def test_concurrent_takers_get_exactly_the_cap(pg_database: PgDatabase) -> None:
    setup = await pg_database.connect()
    connections = [await pg_database.connect() for _ in range(8)]
    try:
        alice = await new_user(setup, "alice")
        gateways = [uuid4(), uuid4()]
        for gateway in gateways:
            await generating.alive(setup, gateway)

        async def four(conn: asyncpg.Connection, gateway: UUID) -> list[UUID | None]:
            return [await take(conn, alice, gateway, cap=3) for _ in range(4)]

        takes = [four(conn, gateways[i % 2]) for i, conn in enumerate(connections)]
        leases = [lease for leases in await asyncio.gather(*takes) for lease in leases]
        assert sum(lease is not None for lease in leases) == 3
        assert await held(setup, alice) == 3
        bob = await new_user(setup, "bob")  # another user's cap is their own
        assert await take(setup, bob, gateways[0], cap=1) is not None
    finally:
        for conn in [setup, *connections]:
            await conn.close()


async def test_a_lease_given_back_is_announced_and_frees_its_place(
    pg_database: PgDatabase,
) -> None:
    conn, listener = await pg_database.connect(), await pg_database.connect()
    try:
        heard = await announcements(listener)
        alice, gateway = await new_user(conn, "alice"), uuid4()
        await generating.alive(conn, gateway)
        lease = await take(conn, alice, gateway, cap=1)
        assert lease is not None
        assert await take(conn, alice, gateway, cap=1) is None
        await generating.release(conn, [lease])
        assert await asyncio.wait_for(heard.get(), 5) == str(alice)
        assert await take(conn, alice, gateway, cap=1) is not None
    finally:
        await conn.close()
        await listener.close()


async def test_the_leases_of_a_gateway_gone_silent_are_dropped(pg_database: PgDatabase) -> None:
    conn, listener = await pg_database.connect(), await pg_database.connect()
    try:
        heard = await announcements(listener)
        alice, bob = await new_user(conn, "alice"), await new_user(conn, "bob")
        silent, live, unknown = uuid4(), uuid4(), uuid4()
        for gateway in (silent, live):
            await generating.alive(conn, gateway)
        await take(conn, alice, silent, cap=5)
        await take(conn, bob, live, cap=5)
        await take(conn, bob, unknown, cap=5)  # a gateway whose row is already gone
        await conn.execute(
            "UPDATE llama_gateways SET seen_at = now() - interval '1 minute' WHERE gateway_id = $1",
            silent,
        )
        await generating.sweep(conn, dead_after=30)
        assert (await held(conn, alice), await held(conn, bob)) == (0, 1)
        gateways = await conn.fetch("SELECT gateway_id FROM llama_gateways")
        assert [row["gateway_id"] for row in gateways] == [live]
        freed = {await asyncio.wait_for(heard.get(), 5) for _ in range(2)}
        assert freed == {str(alice), str(bob)}
        await generating.leave(conn, live)  # a gateway that stops takes its own along
        assert await held(conn, bob) == 0
        assert await conn.fetchval("SELECT count(*) FROM llama_gateways") == 0
    finally:
        await conn.close()
        await listener.close()
