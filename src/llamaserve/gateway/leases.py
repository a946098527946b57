"""The per-user cap on requests generating at once (LLAMA_PROXY_USER_CONCURRENCY), held
across every gateway on the database.

The scheduler caps what this gateway runs of each user; a request it grants a slot
also takes one of the user's leases in the database (`store.generating`), which it
holds until it ends. A user at the cap through other gateways gives the slot back and
is held in this gateway's queue, first in line, until one of their requests ends
anywhere: the database announces it, and a timer tries again in case an announcement
was missed. Without a cap nothing of this touches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any
from uuid import UUID, uuid4

from llamaserve.gateway.db_status import database_errors
from llamaserve.gateway.scheduling import Scheduler
from llamaserve.store import generating

log = logging.getLogger("llamaserve.gateway")

NO_LEASE = UUID(int=0)  # what every request holds when there is no cap
HEARTBEAT = 5.0  # seconds between two signs of life (and sweeps of dead gateways)
DEAD_AFTER = 30.0  # a gateway not seen for this long has its leases dropped
RETRY = 1.0  # seconds a held user waits at most before trying again


class Leases:
    def __init__(self, pool: Any, cap: int, scheduler: Scheduler) -> None:
        self.cap = cap
        self.gateway = uuid4()
        self._pool = pool
        self._scheduler = scheduler
        self._ended: list[UUID] = []  # leases to give back
        self._heard: Counter[int] = Counter()  # by user: how many of their leases ended
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if not self.cap:
            return
        await generating.alive(self._pool, self.gateway)
        self._tasks = [
            asyncio.create_task(self._give_back(), name="leases-give-back"),
            asyncio.create_task(self._keep_alive(), name="leases-keep-alive"),
            asyncio.create_task(self._listen(), name="leases-listen"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tasks:
            with contextlib.suppress(Exception):  # else the others drop them in time
                await generating.leave(self._pool, self.gateway)

    async def take(self, user_id: int) -> UUID | None:
        """One of the user's leases, or None when they have the cap's worth generating."""
        if not self.cap:
            return NO_LEASE
        lease = uuid4()  # made here: a take cut short by a failure is given back too
        try:
            with database_errors():
                taken = await generating.take(
                    self._pool, lease=lease, user_id=user_id, gateway=self.gateway, cap=self.cap
                )
        except BaseException:
            self.give_back(lease)
            raise
        return lease if taken else None

    def give_back(self, lease: UUID) -> None:
        if lease != NO_LEASE:
            self._ended.append(lease)
            self._wake.set()

    def heard(self, user_id: int) -> int:
        """How many of the user's leases this gateway has heard end: read it before a
        `take`, and give it to `hold` if the take fails."""
        return self._heard[user_id]

    def hold(self, user_id: int, since: int) -> bool:
        """Keep the user's requests waiting until one of theirs ends (or `RETRY`); False,
        holding nothing, when one ended since `since` (while the take that failed was
        under way: its announcement has come and gone, and the take may succeed now)."""
        if self._heard[user_id] != since:
            return False
        self._scheduler.block(user_id)
        asyncio.get_running_loop().call_later(RETRY, self._scheduler.unblock, user_id)
        return True

    async def _give_back(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ended, self._ended = self._ended, []
            try:
                await generating.release(self._pool, ended)
            except Exception as exc:
                log.warning("leases: giving back failed (%s); will retry", type(exc).__name__)
                self._ended = ended + self._ended
                await asyncio.sleep(RETRY)
                self._wake.set()

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await generating.alive(self._pool, self.gateway)
                await generating.sweep(self._pool, DEAD_AFTER)
            except Exception as exc:
                log.warning("leases: keep-alive failed (%s)", type(exc).__name__)

    async def _listen(self) -> None:
        """Hear of every lease that ends, on a connection of its own."""
        while True:
            try:
                async with self._pool.acquire() as conn:
                    await self._listen_on(conn)
            except Exception as exc:
                log.warning("leases: listening failed (%s); will retry", type(exc).__name__)
            await asyncio.sleep(RETRY)

    async def _listen_on(self, conn: Any) -> None:
        """Until the connection is lost (or the task cancelled)."""
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def closed(_: Any) -> None:
            if not lost.done():
                lost.set_result(None)

        conn.add_termination_listener(closed)
        await conn.add_listener(generating.FREED, self._freed)
        try:
            await lost
        finally:
            conn.remove_termination_listener(closed)
            with contextlib.suppress(Exception):
                await conn.remove_listener(generating.FREED, self._freed)

    def _freed(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        user_id = int(payload)
        self._heard[user_id] += 1
        self._scheduler.unblock(user_id)
