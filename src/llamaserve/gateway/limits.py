"""Admission of requests in batches, turning an admission into a refusal or OpenAI's
rate-limit headers, and the one place where the database failing a request is mapped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from llamaserve.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from llamaserve.store import limits
from llamaserve.store.limits import Admission

log = logging.getLogger("llamaserve.gateway")


@contextmanager
def database_errors() -> Iterator[None]:
    """A database that cannot answer makes the request a 503 to retry, not a 500."""
    try:
        yield
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("database: %s: %s", type(exc).__name__, exc)
        raise ServiceUnavailable(
            "The gateway cannot reach its user database; try again shortly.",
            code="database_unavailable",
            headers={"Retry-After": "5"},
        ) from exc


class Admissions:
    """Admits requests the way a database commits in groups: a request that comes while
    no admission is under way goes to the database at once; those that come meanwhile
    wait for it, and go together in the next round trip (at most `max_batch`).

    A lone request waits for nothing, and under load the database sees a few statements
    instead of one per request (the benchmark at 32 clients: its CPU per request down
    by a third). Tokens are taken exactly as if one by one.
    """

    def __init__(
        self, pool: Any, default_limit: int, default_window: int, max_batch: int = 256
    ) -> None:
        self._pool = pool
        self._defaults = {"default_limit": default_limit, "default_window": default_window}
        self._max_batch = max_batch
        self._waiting: list[tuple[str, asyncio.Future[Admission | None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def admit(self, key_id: str) -> Admission | None:
        """This request's admission, or None when the key does not exist."""
        future: asyncio.Future[Admission | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((key_id, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="admissions")
        return await future

    async def _run(self) -> None:
        # Not cancelled with any one request: a client that leaves only drops its future.
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                await self._admit(batch)
        finally:
            self._task = None

    async def _admit(self, batch: list[tuple[str, asyncio.Future[Admission | None]]]) -> None:
        try:
            with database_errors():
                found = await limits.admit(
                    self._pool, key_ids=[key_id for key_id, _ in batch], **self._defaults
                )
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), admission in zip(batch, found, strict=True):
            if not future.done():  # done: cancelled, its client went away
                future.set_result(admission)


def refuse_unless_admitted(admission: Admission) -> None:
    if admission.state == "disabled":
        raise PermissionDenied("This user is disabled.", code="user_disabled")
    if admission.state == "revoked":
        raise AuthenticationFailed("This API key has been revoked.", code="key_revoked")
    if admission.state == "expired":
        raise AuthenticationFailed("This API key has expired.", code="key_expired")


def rate_limit_headers(admission: Admission) -> list[tuple[bytes, bytes]]:
    if admission.limit == 0:
        return []
    return [
        (b"x-ratelimit-limit-requests", str(admission.limit).encode()),
        (b"x-ratelimit-remaining-requests", str(admission.remaining).encode()),
        (b"x-ratelimit-reset-requests", format_duration(admission.reset_seconds).encode()),
    ]


def format_duration(seconds: float) -> str:
    """OpenAI's style of duration: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes < 1:
        return f"{secs:.3g}s"
    return f"{int(minutes)}m{int(secs)}s"
