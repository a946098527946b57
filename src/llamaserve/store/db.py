"""Connections to the database named by POSTGRES_AUTH_*, and the one place their errors are mapped.

With no POSTGRES_AUTH_HOST the database is the private cluster's (ops/cluster.py), over
its Unix socket. Connection failures become DatabaseUnavailable with one line saying
what is wrong and what to do; the password never appears in one.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from llamaserve.config import Layout, Settings
from llamaserve.store.errors import DatabaseUnavailable

CONNECT_TIMEOUT = 10.0
PORT = 5432  # the private cluster's: names its socket file only, it listens on no TCP port
SERVER_SETTINGS = {"application_name": "llamaserve"}


def is_private(settings: Settings) -> bool:
    """No POSTGRES_AUTH_HOST: the database is the private cluster's (ops/cluster.py)."""
    return not settings.postgres_auth_host.strip()


def data_dir(layout: Layout) -> Path:
    """The private cluster's data."""
    return layout.runtime / "pgdata"


def socket_dir(layout: Layout) -> Path:
    """The private cluster's socket (mode 0700: its permissions are the access control)."""
    return layout.runtime / "pg"


def connect_kwargs(settings: Settings, layout: Layout) -> dict[str, Any]:
    """asyncpg's connect arguments for the configured database."""
    if is_private(settings):
        return {
            "host": str(socket_dir(layout)),
            "port": PORT,
            "user": settings.postgres_auth_user,
            "database": settings.postgres_auth_db,
            "ssl": False,
        }
    kwargs: dict[str, Any] = {
        "host": settings.postgres_auth_host.strip(),
        "port": settings.postgres_auth_port,
        "user": settings.postgres_auth_user,
        "database": settings.postgres_auth_db,
        "ssl": settings.postgres_auth_sslmode,
    }
    password = settings.postgres_auth_password.get_secret_value()
    if password:
        kwargs["password"] = password
    return kwargs


def describe(settings: Settings, layout: Layout) -> str:
    """Where the database is, for messages: never with the password."""
    if is_private(settings):
        return f"private cluster in {data_dir(layout)}, database {settings.postgres_auth_db}"
    host, port = settings.postgres_auth_host.strip(), settings.postgres_auth_port
    return f"{settings.postgres_auth_user}@{host}:{port}/{settings.postgres_auth_db}"


async def connect(settings: Settings, layout: Layout) -> asyncpg.Connection:
    with map_connect_errors(settings, layout):
        return await asyncpg.connect(
            **connect_kwargs(settings, layout),
            timeout=CONNECT_TIMEOUT,
            server_settings=SERVER_SETTINGS,
        )


async def create_pool(
    settings: Settings,
    layout: Layout,
    *,
    min_size: int = 1,
    max_size: int = 10,
    durable_commits: bool = True,
) -> asyncpg.Pool:
    """A connection pool. With `durable_commits=False` a commit does not wait for its WAL
    flush (PostgreSQL's synchronous_commit=off): a server crash may forget the last
    fraction of a second of commits, but never corrupts anything.

    Nothing of Llamaserve leaves session state on a connection (its settings and locks
    are transaction-scoped), so a released connection skips asyncpg's reset query, a
    round trip on every release; asyncpg still rolls back a transaction left open."""
    server_settings = dict(SERVER_SETTINGS)
    if not durable_commits:
        server_settings["synchronous_commit"] = "off"
    with map_connect_errors(settings, layout):
        return await asyncpg.create_pool(
            **connect_kwargs(settings, layout),
            timeout=CONNECT_TIMEOUT,
            server_settings=server_settings,
            min_size=min_size,
            max_size=max_size,
            reset=_keep_session,
        )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """asyncpg's `reset` hook: nothing to undo (see create_pool)."""


@contextlib.contextmanager
def map_connect_errors(settings: Settings, layout: Layout) -> Iterator[None]:
    """Re-raise a failure to connect as DatabaseUnavailable, with what to do about it."""
    try:
        yield
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(explain(exc, settings, layout)) from exc


def explain(exc: BaseException, settings: Settings, layout: Layout) -> str:
    """One line: what failed reaching the database, and what to do about it."""
    where = describe(settings, layout)
    user, database = settings.postgres_auth_user, settings.postgres_auth_db
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return (
            f"PostgreSQL refused the password of {user} ({where}): "
            "check POSTGRES_AUTH_USER and POSTGRES_AUTH_PASSWORD in .env"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"PostgreSQL refused user {user} ({where}): {exc}; check POSTGRES_AUTH_USER in .env"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return (
            f"database {database} does not exist ({where}): create it "
            f"(createdb -O {user} {database}) or set POSTGRES_AUTH_DB in .env"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return f"PostgreSQL refused the connection ({where}): {exc}"
    if is_private(settings):
        return (
            f"cannot reach the private PostgreSQL cluster ({where}): it is not running; "
            "any ./bin/user_management_cli.sh command or ./console.sh start starts it"
        )
    if isinstance(exc, ssl.SSLError) or "SSL" in str(exc):
        return (
            f"SSL failed connecting to {where} ({exc}): "
            "set POSTGRES_AUTH_SSLMODE in .env to what the server supports"
        )
    reason = "timed out" if isinstance(exc, TimeoutError) else _reason(exc)
    return (
        f"cannot reach PostgreSQL at {where} ({reason}): is the server running? "
        "Start it (docker compose up -d postgres) or fix POSTGRES_AUTH_HOST/PORT in .env"
    )


def _reason(exc: BaseException) -> str:
    strerror = exc.strerror if isinstance(exc, OSError) else None
    return strerror or str(exc) or type(exc).__name__
