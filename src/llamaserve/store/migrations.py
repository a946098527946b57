"""Versioned migrations: the files `store/migrations/NNNN_name.sql`, applied in order by init-db.

Applied versions are recorded in `llamaserve_schema`. All pending migrations run in one
transaction under an advisory lock, so a failed migration changes nothing and two
concurrent `init-db` runs apply each migration once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from llamaserve.store.errors import SchemaMismatch

# pg_advisory_xact_lock's key for migrations: any constant, as long as it is ours alone.
LOCK_KEY = 0x6C6C616D61_0001  # "llama", 1
INIT_DB = "./bin/user_management_cli.sh init-db"
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """Every migration shipped with this code, by version (1, 2, ... with no gap)."""
    directory = resources.files("llamaserve.store").joinpath("migrations")
    found = []
    for entry in directory.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1, 2, ... without gaps: {found!r}")
    return found


def latest() -> int:
    return len(available())


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the pending migrations; the versions applied (empty when up to date)."""
    migrations = available()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS llamaserve_schema (
                   version    integer PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT now()
               )"""
        )
        current = await _current(conn)
        _refuse_newer(current, len(migrations))
        pending = [m for m in migrations if m.version > (current or 0)]
        for migration in pending:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO llamaserve_schema (version) VALUES ($1)", migration.version
            )
    return [m.version for m in pending]


async def check_schema(conn: asyncpg.Connection) -> int:
    """The schema version, if it is exactly the one this code expects; else SchemaMismatch."""
    expected = latest()
    exists = await conn.fetchval("SELECT to_regclass('llamaserve_schema') IS NOT NULL")
    current = await _current(conn) if exists else None
    if current is None:
        raise SchemaMismatch(
            f"the database is not initialised: run {INIT_DB}", found=None, expected=expected
        )
    _refuse_newer(current, expected)
    if current < expected:
        raise SchemaMismatch(
            f"the database schema is at version {current}, this Llamaserve needs {expected}: "
            f"run {INIT_DB}",
            found=current,
            expected=expected,
        )
    return current


async def _current(conn: asyncpg.Connection) -> int | None:
    version: int | None = await conn.fetchval("SELECT max(version) FROM llamaserve_schema")
    return version


def _refuse_newer(current: int | None, expected: int) -> None:
    if current is not None and current > expected:
        raise SchemaMismatch(
            f"the database schema is at version {current}, newer than this Llamaserve knows "
            f"({expected}): upgrade Llamaserve (git pull && ./runtime/install.sh) or use "
            "another database",
            found=current,
            expected=expected,
        )
