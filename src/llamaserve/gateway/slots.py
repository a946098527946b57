"""A fair slot of an engine for one request: a place in this gateway's fair queue
(`Scheduler`), then one of the user's leases under the per-user cap across gateways
(`Leases`); on the engine that likely holds its prompt cached, if it has a free slot
(`PrefixMap`, with LLAMA_PROXY_ROUTING=prefix). A request that does not generate takes
any healthy engine.

The fair queue counts each user's service in tokens: a request is charged its estimate
when granted its slot, and the engine's exact count when it gives the slot back, or, for
a request cut off (its count read from the engine afterwards), when its row is done
(`settle`)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from llamaserve.gateway.admission import refuse_unless_usable
from llamaserve.gateway.affinity import Prefixes, PrefixMap, prefixes_of
from llamaserve.gateway.db_status import database_errors
from llamaserve.gateway.engines import EngineWatch
from llamaserve.gateway.leases import Leases
from llamaserve.gateway.scheduling import EngineState, Scheduler
from llamaserve.store import limits
from llamaserve.store.requests import RequestRow

# A request that waited this long (seconds) in the queue checks its key again as it
# leaves: a key revoked meanwhile is refused. Shorter waits skip the round trip.
RECHECK_AFTER = 1.0


class Slots:
    def __init__(
        self,
        scheduler: Scheduler,
        leases: Leases,
        watch: EngineWatch,
        pool: Any,
        affinity: PrefixMap | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.leases = leases
        self.watch = watch
        self.pool = pool
        self.affinity = affinity  # None: least-loaded routing (or one engine)
        # Requests whose tokens were not known when they gave their slot back: the user
        # and the estimate they were charged, by request id, until `settle`.
        self._unsettled: dict[str, tuple[int, int]] = {}

    def prefixes(self, path: str, body: dict[str, Any]) -> Prefixes | None:
        """What routing by prefix needs of a request's body; None when it is off."""
        return prefixes_of(path, body) if self.affinity is not None else None

    @contextlib.asynccontextmanager
    async def engine(
        self,
        row: RequestRow,
        exclude: EngineState | None,
        prefixes: Prefixes | None = None,
        cost: int = 0,
    ) -> AsyncIterator[EngineState]:
        """A slot of an engine for generation (its wait added to `row.queue_ms`),
        preferably where the longest of its `prefixes` went, charging its user `cost`
        tokens until its exact count is known; any healthy engine for the rest."""
        if row.method != "POST":
            yield self.scheduler.any_engine(exclude)
            return
        user = row.user_id
        assert user is not None  # admitted
        affinity = self.affinity if prefixes is not None else None
        prefer = affinity.holder(prefixes) if affinity is not None and prefixes else None
        engine, lease = await self._slot(row, user, exclude, prefer, cost)
        if affinity is not None and prefixes:
            affinity.remember(prefixes, engine)  # sent there: its prompt is cached there now
        try:
            yield engine
        finally:
            self._charge(row, user, cost)
            self.scheduler.release(user, engine, cost)
            self.leases.give_back(lease)

    def settle(self, row: RequestRow) -> None:
        """Charge the exact tokens of a request that gave its slot back without them (read
        from the engine since, or none if it could not say)."""
        unsettled = self._unsettled.pop(row.request_id, None)
        if unsettled is not None:
            user, charged = unsettled
            self.scheduler.served(user, (_tokens(row) or 0) - charged)

    def _charge(self, row: RequestRow, user: int, charged: int) -> None:
        """Replace the estimate charged by the exact count, before the slot goes to the
        next user; a request the engine never had costs nothing."""
        used = _tokens(row)
        if used is None and row.engine is not None:
            self._unsettled[row.request_id] = (user, charged)  # counted after the cut
            return
        self.scheduler.served(user, (used or 0) - charged)

    def take_out(self, engine: EngineState, reason: str) -> None:
        """An engine that could not take a request: no more requests until it is back."""
        self.watch.take_out(engine, reason)

    def has_other(self, engine: EngineState) -> bool:
        return self.scheduler.has_other(engine)

    async def _slot(
        self,
        row: RequestRow,
        user: int,
        exclude: EngineState | None,
        prefer: EngineState | None,
        cost: int,
    ) -> tuple[EngineState, uuid.UUID]:
        """A slot of an engine, and one of the user's leases under the cap across gateways
        (see `Leases`): a user at the cap through other gateways gives the slot back and
        waits, first in line, until one of their requests ends."""
        scheduler, leases = self.scheduler, self.leases
        deadline = time.monotonic() + scheduler.limits.max_wait
        again = False
        while True:
            began = time.monotonic()
            try:
                grant = await scheduler.acquire(
                    user,
                    exclude,
                    again=again,
                    max_wait=deadline - began,
                    prefer=prefer,
                    cost=cost,
                )
            except BaseException:  # timed out, gone, stopped: the wait is logged all the same
                row.queue_ms = (row.queue_ms or 0.0) + (time.monotonic() - began) * 1000
                raise
            row.queue_ms = (row.queue_ms or 0.0) + grant.waited * 1000
            heard = leases.heard(user)
            try:
                if grant.waited >= RECHECK_AFTER:
                    assert row.key_id is not None  # authenticated
                    await self._still_usable(row.key_id)
                lease = await leases.take(user)
            except BaseException:
                scheduler.served(user, -grant.charged)
                scheduler.release(user, grant.engine, grant.charged)
                raise
            if lease is not None:
                return grant.engine, lease
            leases.hold(user, since=heard)  # before the slot goes back: not to this user again
            scheduler.served(user, -grant.charged)
            scheduler.release(user, grant.engine, grant.charged)
            again = True

    async def _still_usable(self, key_id: str) -> None:
        """A key revoked, expired or whose user was disabled while its request waited is
        refused when the request leaves the queue: a leaked key's backlog never runs."""
        with database_errors():
            state = await limits.key_state(self.pool, key_id=key_id)
        refuse_unless_usable(state)


def _tokens(row: RequestRow) -> int | None:
    """A request's tokens, prompt and completion, as the engine counted them."""
    if row.prompt_tokens is None and row.completion_tokens is None:
        return None
    return (row.prompt_tokens or 0) + (row.completion_tokens or 0)
