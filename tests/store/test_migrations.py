"""Migrations: applied once, safe to run twice and concurrently, all or nothing; a schema
that is missing, older or newer than the code is reported with what to do."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from llamaserve.store import migrations
from llamaserve.store.errors import SchemaMismatch
from llamaserve.store.migrations import Migration
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio

TABLES = {
    "llamaserve_schema", "users", "api_keys", "rate_limit_state", "llama_requests",
    "llama_gateways", "llama_generating", "llama_responses", "quota_usage", "token_rate_state",
    "llama_dashboard_sessions", "llama_usage_hourly", "llama_latency_hourly",
}  # fmt: skip
SHIPPED = list(range(1, migrations.latest() + 1))


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


def with_extra(sql: str) -> list[Migration]:
    """The shipped migrations and one more, as a newer Llamaserve would ship it."""
    shipped = migrations.available()
    return [*shipped, Migration(len(shipped) + 1, "9999_extra.sql", sql)]


def test_shipped_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in migrations.available()]
    assert versions == list(range(1, len(versions) + 1))
    assert migrations.latest() == versions[-1]


async def test_migrate_creates_the_schema_and_is_safe_to_run_twice(
    pg_empty_database: PgDatabase,
) -> None:
    conn = await pg_empty_database.connect()
    try:
        assert await migrations.migrate(conn) == SHIPPED
        assert await tables(conn) >= TABLES
        assert await migrations.migrate(conn) == []
        assert await migrations.check_schema(conn) == migrations.latest()
        assert await conn.fetchval("SELECT count(*) FROM llamaserve_schema") == len(SHIPPED)
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_version_once(
    pg_empty_database: PgDatabase,
) -> None:
    conns = [await pg_empty_database.connect() for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrations.migrate(conn) for conn in conns))
        assert sorted(results) == [[], [], [], SHIPPED]
        assert await conns[0].fetchval("SELECT count(*) FROM llamaserve_schema") == len(SHIPPED)
    finally:
        for conn in conns:
            await conn.close()


async def test_an_uninitialised_database_is_reported(pg_empty_database: PgDatabase) -> None:
    conn = await pg_empty_database.connect()
    try:
        with pytest.raises(SchemaMismatch, match=r"not initialised: run .*init-db") as caught:
            await migrations.check_schema(conn)
        assert caught.value.found is None and not caught.value.too_new
    finally:
        await conn.close()


async def test_a_newer_schema_is_refused(pg_conn: asyncpg.Connection) -> None:
    await pg_conn.execute("INSERT INTO llamaserve_schema (version) VALUES (99)")
    with pytest.raises(SchemaMismatch, match="version 99, newer than this Llamaserve") as caught:
        await migrations.check_schema(pg_conn)
    assert caught.value.too_new
    with pytest.raises(SchemaMismatch, match="newer"):
        await migrations.migrate(pg_conn)


async def test_an_older_schema_asks_for_init_db_which_upgrades_it(
    pg_conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgraded = with_extra("CREATE TABLE extra (x int)")
    monkeypatch.setattr(migrations, "available", lambda: upgraded)
    newest = len(upgraded)
    with pytest.raises(
        SchemaMismatch, match=f"version {newest - 1}, this Llamaserve needs {newest}: run"
    ):
        await migrations.check_schema(pg_conn)
    assert await migrations.migrate(pg_conn) == [newest]
    assert await migrations.check_schema(pg_conn) == newest
    assert "extra" in await tables(pg_conn)


async def test_a_failing_migration_changes_nothing(
    pg_empty_database: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = with_extra("CREATE TABLE half_done (x int); SELECT no_such_function();")
    monkeypatch.setattr(migrations, "available", lambda: broken)
    conn = await pg_empty_database.connect()
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrations.migrate(conn)
        assert await tables(conn) == set()  # not even version 1, applied in the same run
    finally:
        await conn.close()
