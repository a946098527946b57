"""The request log writer: rows are queued without waiting and written in batches.

Writing adds no latency to a request. Rows still queued at shutdown are written
before the gateway exits; a batch the database refuses is retried. Rows the database
cannot take in time (the backlog outgrows `max_backlog`, or the gateway stops while
the database is away) are kept on disk, in the spool directory, and written when it
takes rows again (at the latest when a gateway on the same runtime directory starts).

No row stops the others. Its text is made storable as it is queued (escaped, bounded:
see `store.requests`); a batch the database still refuses for what some of its rows hold
(`refused_for_data`) is halved until only those rows are left, and the others are
written. The rows refused are set aside in `rejected/` under the spool directory, one
file (mode 600, a line per row with the reason) per batch, said once in the log, and
never retried: they would fail again. A spooled file that cannot be read is moved there
whole.
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

from llamaserve.gateway import db_status
from llamaserve.store.requests import RequestRow, insert_requests, refused_for_data, storable

log = logging.getLogger("llamaserve.gateway")

REASON_CHARS = 300  # of a refusal's reason in the log (PostgreSQL's may quote a value)


class _Unwritten(Exception):
    """A write that failed for a reason other than its rows (`__cause__`); `rows` were
    not written, in their order."""

    def __init__(self, rows: list[RequestRow]) -> None:
        super().__init__(f"{len(rows)} rows not written")
        self.rows = rows


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
        self._rejected = spool / "rejected"
        self._rows: list[RequestRow] = []
        self._batch_size = batch_size
        self._interval = interval
        self._max_backlog = max_backlog
        self._wake = asyncio.Event()
        self._closing = False
        self._failing = False  # the last write failed (said once, until one succeeds)
        self._task: asyncio.Task[None] | None = None
        self._counted: dict[Path, tuple[int, int, int]] = {}  # spooled: mtime, size, rows

    def add(self, row: RequestRow) -> None:
        # Made storable now, not as it is written: a backlog of rows holding a client's
        # megabyte would hold it in memory until then.
        self._rows.append(storable(row))
        if len(self._rows) >= self._batch_size:
            self._wake.set()

    @property
    def waiting(self) -> int:
        """Rows queued in memory, not written yet."""
        return len(self._rows)

    def spooled(self) -> int:
        """Rows kept on disk until the database takes them (by any gateway on this runtime
        directory). A file is read once: it is written whole, and rewritten only smaller."""
        counted: dict[Path, tuple[int, int, int]] = {}
        for path in self._spool.glob("*.jsonl") if self._spool.is_dir() else []:
            with contextlib.suppress(OSError):
                stat = path.stat()
                known = self._counted.get(path)
                if known is None or known[:2] != (stat.st_mtime_ns, stat.st_size):
                    known = (stat.st_mtime_ns, stat.st_size, path.read_bytes().count(b"\n"))
                counted[path] = known
        self._counted = counted
        return sum(rows for _, _, rows in counted.values())

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
        try:
            await self._write(batch)
        except _Unwritten as failed:
            self._put_back(failed)
            return False
        db_status.status.answered()
        if self._failing:
            self._failing = False
            log.warning("request log: writing again")
            await self._write_spooled()
        return True

    def _put_back(self, failed: _Unwritten) -> None:
        """Put the rows not written back at the front, so that rows keep their order."""
        exc = failed.__cause__
        if isinstance(exc, db_status.FAILURES):
            db_status.status.failed(exc)
        self._rows = failed.rows + self._rows
        if len(self._rows) > self._max_backlog:  # the oldest half goes to disk
            excess = len(self._rows) - self._max_backlog // 2
            self._keep_on_disk(self._rows[:excess])
            del self._rows[:excess]
        if not self._failing:
            log.warning("request log: write failed (%s); will retry", type(exc).__name__)
        self._failing = True

    async def _write(self, rows: list[RequestRow]) -> int:
        """Write `rows`, and say how many were; a part refused for what its rows hold is
        halved until the rows refused are alone, and those are set aside. Raises
        _Unwritten on any other failure."""
        parts, refused = [rows], []
        try:
            while parts:
                try:
                    await insert_requests(self._pool, rows=parts[0])
                except Exception as exc:
                    if not refused_for_data(exc):
                        raise _Unwritten([row for part in parts for row in part]) from exc
                    part = parts.pop(0)
                    if len(part) == 1:
                        refused.append((part[0], f"{type(exc).__name__}: {exc}"))
                    else:
                        parts[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                    continue
                del parts[0]
            return len(rows) - len(refused)
        finally:
            self._set_aside(refused)

    def _set_aside(self, refused: list[tuple[RequestRow, str]]) -> None:
        """Rows the database refused for what they hold: kept for an operator to read,
        not retried."""
        if not refused:
            return
        lines = [json.dumps({"reason": why, "row": _as_json(row)}) for row, why in refused]
        try:
            path = _write_file(_new_file(self._rejected), lines)
        except OSError as exc:
            log.error("request log: lost %d rows the database refused; %s could not be "
                      "written (%s)", len(refused), self._rejected, exc)  # fmt: skip
            return
        reasons = "; ".join(sorted({why[:REASON_CHARS] for _, why in refused})[:3])
        log.warning(
            "request log: the database refused %d rows for what they hold (%s); set aside "
            "in %s, not retried", len(refused), reasons, path,
        )  # fmt: skip

    def _keep_on_disk(self, rows: list[RequestRow]) -> None:
        """Rows the database cannot take now, in a file of their own, written by
        `_write_spooled`."""
        if not rows:
            return
        try:
            path = _write_file(_new_file(self._spool), [json.dumps(_as_json(r)) for r in rows])
        except OSError as exc:
            log.error("request log: lost %d rows: the database would not take them and "
                      "%s could not be written (%s)", len(rows), self._spool, exc)  # fmt: skip
            return
        log.warning(
            "request log: the database did not take %d rows; kept in %s until it does",
            len(rows), path,
        )  # fmt: skip

    async def _write_spooled(self) -> None:
        """Write the files of rows kept on disk, oldest first; each goes once written.
        One the database fails to take keeps only the rows not written yet."""
        for path in sorted(self._spool.glob("*.jsonl")) if self._spool.is_dir() else []:
            rows = self._read_spooled(path)
            if rows is None:
                continue
            try:
                written = await self._write(rows)
            except _Unwritten as failed:
                if len(failed.rows) < len(rows):
                    self._keep_unwritten(path, failed.rows)
                log.warning("request log: %s not written yet (%s)",
                            path, type(failed.__cause__).__name__)  # fmt: skip
                return
            path.unlink()
            log.warning("request log: wrote the %d rows kept in %s", written, path)

    def _keep_unwritten(self, path: Path, rows: list[RequestRow]) -> None:
        """A spooled file, part of which was written (or set aside), keeps only the rest."""
        try:
            _write_file(path, [json.dumps(_as_json(row)) for row in rows])
        except OSError as exc:
            log.error("request log: %s could not be rewritten (%s); the rows of it already "
                      "written will be written again", path, exc)  # fmt: skip

    def _read_spooled(self, path: Path) -> list[RequestRow] | None:
        """The rows of a spooled file; None for one that cannot be read, moved whole to
        `rejected/` if it is its content that is wrong."""
        try:
            return [_from_json(json.loads(line)) for line in path.read_text().splitlines()]
        except OSError as exc:
            log.warning("request log: %s cannot be read (%s)", path, exc)
        except (ValueError, TypeError, KeyError) as exc:
            with contextlib.suppress(OSError):
                self._rejected.mkdir(parents=True, exist_ok=True)
                path.chmod(0o600)  # as the gateway's own files: rows name users
                path.rename(self._rejected / path.name)
            log.warning("request log: %s holds what is not a row (%s: %s); set aside in %s, "
                        "not retried", path, type(exc).__name__, exc, self._rejected)  # fmt: skip
        return None


def _new_file(directory: Path) -> Path:
    """The path of a new file of rows in `directory`; names sort as their times."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return directory / f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"


def _write_file(path: Path, lines: list[str]) -> Path:
    """`path` holds `lines` (mode 600: rows name users and their addresses), whole or not
    at all: a file in the spool is never read half-written."""
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(line + "\n" for line in lines)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)
    return path


def _as_json(row: RequestRow) -> dict[str, Any]:
    values = dataclasses.asdict(row)
    values["created_at"] = row.created_at.isoformat()
    return values


def _from_json(values: dict[str, Any]) -> RequestRow:
    return RequestRow(**{**values, "created_at": datetime.fromisoformat(values["created_at"])})
