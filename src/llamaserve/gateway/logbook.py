"""The request log writer: rows are queued without waiting and written in batches.

Writing adds no latency to a request. Rows still queued at shutdown are written
before the gateway exits; a batch the database refuses is retried. Rows the database
cannot take in time (the backlog outgrows `max_backlog`, or the gateway stops while
the database is away) are kept on disk, in the spool directory, and written when it
takes rows again (at the latest when a gateway on the same runtime directory starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from llamaserve.gateway import database
from llamaserve.store.requests import RequestRow, insert_requests

log = logging.getLogger("llamaserve.gateway")


class RequestLog:
    def __init__(
        self,
        pool: Any,
        spool: Path,
        *,
        batch_size: int = 500,
        interval: float = 0.2,
        max_backlog: int = 100_000,
    ) -> None:
        self._pool = pool
        self._spool = spool
        self._rows: list[RequestRow] = []
        self._batch_size = batch_size
        self._interval = interval
        self._max_backlog = max_backlog
        self._wake = asyncio.Event()
        self._closing = False
        self._failing = False  # the last write failed (said once, until one succeeds)
        self._task: asyncio.Task[None] | None = None

    def add(self, row: RequestRow) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._batch_size:
            self._wake.set()

    async def start(self) -> None:
        """Write the rows kept on disk (the database is there: the gateway checked it),
        then start the writer."""
        await self._write_spooled()
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
        self._keep_on_disk(self._rows)
        self._rows = []

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
        except Exception as exc:
            if isinstance(exc, database.FAILURES):
                database.status.failed(exc)
            self._rows = batch + self._rows
            if len(self._rows) > self._max_backlog:  # the oldest half goes to disk
                excess = len(self._rows) - self._max_backlog // 2
                self._keep_on_disk(self._rows[:excess])
                del self._rows[:excess]
            if not self._failing:
                log.warning("request log: write failed (%s); will retry", type(exc).__name__)
            self._failing = True
            return False
        database.status.answered()
        if self._failing:
            self._failing = False
            log.warning("request log: writing again")
            await self._write_spooled()
        return True

    def _keep_on_disk(self, rows: list[RequestRow]) -> None:
        """Rows the database cannot take now, in a file of their own (mode 600: they name
        users and their addresses), written by `_write_spooled`."""
        if not rows:
            return
        try:
            self._spool.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            path = self._spool / f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            partial = path.with_suffix(".partial")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                for row in rows:
                    out.write(json.dumps(_as_json(row)) + "\n")
                out.flush()
                os.fsync(out.fileno())
            partial.rename(path)
        except OSError as exc:
            log.error("request log: lost %d rows: the database would not take them and "
                      "%s could not be written (%s)", len(rows), self._spool, exc)  # fmt: skip
            return
        log.warning(
            "request log: the database did not take %d rows; kept in %s until it does",
            len(rows), path,
        )  # fmt: skip

    async def _write_spooled(self) -> None:
        """Write the files of rows kept on disk, oldest first; each goes once written."""
        for path in sorted(self._spool.glob("*.jsonl")) if self._spool.is_dir() else []:
            try:
                rows = [_from_json(json.loads(line)) for line in path.read_text().splitlines()]
                await insert_requests(self._pool, rows=rows)
            except Exception as exc:
                log.warning("request log: %s not written yet (%s)", path, type(exc).__name__)
                return
            path.unlink()
            log.warning("request log: wrote the %d rows kept in %s", len(rows), path)


def _as_json(row: RequestRow) -> dict[str, Any]:
    values = dataclasses.asdict(row)
    values["created_at"] = row.created_at.isoformat()
    return values


def _from_json(values: dict[str, Any]) -> RequestRow:
    return RequestRow(**{**values, "created_at": datetime.fromisoformat(values["created_at"])})
