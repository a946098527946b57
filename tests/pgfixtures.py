"""A real PostgreSQL for the tests, started by the product's own ops/cluster.py.

`pg_cluster` (session): a private cluster in a temporary runtime directory, started the
way the CLI and console.sh start it (as the `postgres` user when the tests run as root).
`pg_database` (per test): a fresh database with the current schema, dropped afterwards,
with the Settings, Layout and environment that reach it; `pg_empty_database`: the same
without tables. `pg_conn` (per anyio test): a connection to `pg_database`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llamaserve.config import Layout, Settings
from llamaserve.ops import cluster
from llamaserve.store import db, migrations
from tests.conftest import ROOT

USER = "llamaserve"
TEMPLATE = "llamaserve_template"  # migrated once; each test's database is a copy
# The tests' cluster is thrown away after them: it need not survive a crash, so it never
# waits for its writes to reach the disk (every test makes and drops a database).
DISPOSABLE = [
    "ALTER SYSTEM SET fsync = off",
    "ALTER SYSTEM SET full_page_writes = off",
    "SELECT pg_reload_conf()",
]


@dataclass(frozen=True)
class PgCluster:
    root: Path
    layout: Layout

    def settings(self, database: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "llama_runtime_dir": self.layout.runtime,
            "postgres_auth_host": "",
            "postgres_auth_db": database,
            "postgres_auth_user": USER,
            **overrides,
        }
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    def env(self, database: str, **overrides: str) -> dict[str, str]:
        """The environment of a subprocess (the CLI) that should use `database`.

        Every setting the CLI's output depends on is set here, so that the checkout's
        own .env cannot change what the tests see.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "POSTGRES_"))}
        env.update(
            LLAMA_RUNTIME_DIR=str(self.layout.runtime),
            LLAMA_PROXY_RATE_LIMIT="60",
            LLAMA_PROXY_RATE_WINDOW_SECONDS="60",
            POSTGRES_AUTH_HOST="",
            POSTGRES_AUTH_PORT="5432",
            POSTGRES_AUTH_DB=database,
            POSTGRES_AUTH_USER=USER,
            POSTGRES_AUTH_PASSWORD="",
            POSTGRES_AUTH_SSLMODE="prefer",
        )
        env.update(overrides)
        return env

    async def admin(self, sql: str) -> None:
        conn = await db.connect(self.settings("postgres"), self.layout)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


@dataclass(frozen=True)
class PgDatabase:
    name: str
    cluster: PgCluster
    settings: Settings
    layout: Layout
    env: dict[str, str]

    async def connect(self) -> asyncpg.Connection:
        return await db.connect(self.settings, self.layout)

    def execute(self, sql: str, *args: Any) -> None:
        """Run one statement from synchronous code (the CLI tests)."""

        async def run() -> None:
            conn = await self.connect()
            try:
                await conn.execute(sql, *args)
            finally:
                await conn.close()

        asyncio.run(run())


async def log_request(conn: asyncpg.Connection, **columns: Any) -> None:
    """One llama_requests row, as the gateway would write it; `ago` is a timedelta."""
    values: dict[str, Any] = {
        "request_id": secrets.token_hex(8),
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "latency_ms": 100.0,
        **columns,
    }
    ago = values.pop("ago", timedelta(0))
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(2, len(values) + 2))
    await conn.execute(
        f"INSERT INTO llama_requests (created_at, {names}) VALUES (now() - $1::interval, {params})",
        ago,
        *values.values(),
    )


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    # Not under pytest's tmp_path: that is private to us (mode 0700), and when we are
    # root the cluster runs as `postgres`, which must be able to enter the directory.
    root = Path(tempfile.mkdtemp(prefix="llamaserve-pg-"))
    root.chmod(0o755)
    runtime = root / "runtime"
    pg = PgCluster(root, Layout(ROOT, runtime, ROOT / "models"))
    try:
        cluster.ensure_running(pg.settings(TEMPLATE), pg.layout)
        for statement in DISPOSABLE:
            asyncio.run(pg.admin(statement))
        asyncio.run(_migrate(pg.settings(TEMPLATE), pg.layout))
        yield pg
    finally:
        cluster.stop(pg.layout, timeout=10)
        shutil.rmtree(root, ignore_errors=True)


async def _migrate(settings: Settings, layout: Layout) -> None:
    conn = await db.connect(settings, layout)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()


def _database(pg: PgCluster, template: str) -> Iterator[PgDatabase]:
    name = f"test_{secrets.token_hex(6)}"
    asyncio.run(pg.admin(f"CREATE DATABASE {name} TEMPLATE {template}"))
    try:
        yield PgDatabase(name, pg, pg.settings(name), pg.layout, pg.env(name))
    finally:
        asyncio.run(pg.admin(f"DROP DATABASE {name} WITH (FORCE)"))


@pytest.fixture
def pg_database(pg_cluster: PgCluster) -> Iterator[PgDatabase]:
    """A fresh database with the current schema."""
    yield from _database(pg_cluster, TEMPLATE)


@pytest.fixture
def pg_empty_database(pg_cluster: PgCluster) -> Iterator[PgDatabase]:
    """A fresh database without any of our tables."""
    yield from _database(pg_cluster, "template1")


@pytest.fixture
async def pg_conn(pg_database: PgDatabase) -> AsyncIterator[asyncpg.Connection]:
    """A connection to `pg_database`, for tests marked anyio."""
    conn = await pg_database.connect()
    try:
        yield conn
    finally:
        await conn.close()
