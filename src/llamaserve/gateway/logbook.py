"""The request log writer: rows are queued without waiting and written in batches.

Writing adds no latency to a request. Rows still queued at shutdown are written
before the gateway exits; a batch the database refuses is retried, and dropped (with
a log line) only when the backlog outgrows `max_backlog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from llamaserve.store.requests import RequestRow, insert_requests

log = logging.getLogger("llamaserve.gateway")


class RequestLog:
    def __init__(
        self,
        pool: Any,
        *,
        batch_size: int = 500,
        interval: float = 0.2,
        max_backlog: int = 100_000,
    ) -> None:
        self._pool = pool
        self._rows: list[RequestRow] = []
        self._batch_size = batch_size
        self._interval = interval
        self._max_backlog = max_backlog
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def add(self, row: RequestRow) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="request-log")

    async def close(self) -> None:
        """Stop the writer once its current batch is written, then write what is left.

        The writer is never cancelled: a batch interrupted mid-write would be lost.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for _ in range(3):
            if await self._flush():
                return

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> bool:
        if not self._rows:
            return True
        batch, self._rows = self._rows, []
        # A failed batch goes back to the front, so that rows keep their order.
        try:
            await insert_requests(self._pool, rows=batch)
            return True
        except Exception as exc:
            self._rows = batch + self._rows
            if len(self._rows) > self._max_backlog:
                dropped = len(self._rows) - self._max_backlog
                del self._rows[:dropped]
                log.error("request log: dropped %d rows the database would not take", dropped)
            log.warning("request log: write failed (%s); will retry", type(exc).__name__)
            return False
