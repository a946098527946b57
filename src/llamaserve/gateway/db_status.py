"""Whether the user database answers, and the one place where its failing a request is
mapped.

A database that cannot answer makes each request a 503 to retry. The log says so once
when it goes away (with where it is and what to do), once a minute while it stays away,
and once when it answers again: not once per refused request, and not with the
traceback asyncpg's pool logs each time it fails to reconnect (every 1 to 60 s).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import asyncpg

from llamaserve.config import Layout, Settings
from llamaserve.errors import ServiceUnavailable, retry_soon
from llamaserve.store import db

log = logging.getLogger("llamaserve.gateway")

REMIND_EVERY = 60.0  # seconds between two "still unreachable" lines
FAILURES = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# Errors of PostgreSQL that are about the connection, not the statement.
_CONNECTION = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up
    asyncpg.InsufficientResourcesError,  # class 53: too many connections
    asyncpg.InvalidAuthorizationSpecificationError,  # class 28: user or password
)


def unreachable(exc: BaseException) -> bool:
    """The database did not answer (down, restarting, the connection lost), as opposed to
    refusing a statement: what was asked of it may be asked again."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, _CONNECTION)
    return isinstance(exc, FAILURES)


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class DatabaseStatus:
    """Answering, or not since a moment; every change is one line of the log. A statement
    the database refuses is logged each time: it still answers."""

    def __init__(self) -> None:
        self.explain: Callable[[BaseException], str] = _cause
        self.down_since: float | None = None
        self._reminded = 0.0

    def describe(self, settings: Settings, layout: Layout) -> None:
        """Name the database, and what to do, in what the log says of it."""

        self.explain = lambda exc: db.explain(exc, settings, layout)

    def failed(self, exc: BaseException) -> None:
        if not unreachable(exc):
            log.warning("database: a statement failed: %s", _cause(exc))  # it answers
            return
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = self._reminded = now
            log.warning(
                "database: %s; requests get 503 (database_unavailable) until it answers",
                self.explain(exc),
            )
        elif now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            log.warning(
                "database: still not answering after %.0f s: %s", now - self.down_since, _cause(exc)
            )

    def answered(self) -> None:
        if self.down_since is not None:
            away = time.monotonic() - self.down_since
            log.warning("database: answering again after %.1f s", away)
            self.down_since = None


# One per process: a gateway process has one database, and asyncpg's logger is global.
status = DatabaseStatus()


@contextmanager
def database_errors() -> Iterator[None]:
    """A database that cannot answer makes the request a 503 to retry, not a 500."""
    try:
        yield
    except FAILURES as exc:
        status.failed(exc)
        raise ServiceUnavailable(
            "The gateway cannot reach its user database; try again shortly.",
            code="database_unavailable",
            headers=retry_soon(),
        ) from exc
    if status.down_since is not None:
        status.answered()


class _PoolReconnects(logging.Filter):
    """asyncpg's pool logs a traceback each time it fails to restore its minimum of
    connections: the failure goes to `status` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            status.failed(record.exc_info[1])
            return False
        return True


_pool_filter = _PoolReconnects()


def watch_pool_reconnects() -> None:
    logging.getLogger("asyncpg.pool").addFilter(_pool_filter)  # adding twice adds it once
