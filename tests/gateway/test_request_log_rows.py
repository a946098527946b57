"""No row stops the request log, on a real database: text PostgreSQL refuses (NUL, lone
surrogates) is stored escaped, a megabyte is cut, a row refused all the same is set aside
on disk, and every other row, before and after it, is written. The same for the rows
kept on disk (the spool)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llamaserve.gateway.logbook import RequestLog
from llamaserve.store import db
from llamaserve.store.requests import RequestRow
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio

MB = 1 << 20
TEXT_LIMIT = 4096  # characters of a stored text value, as store/requests.py documents
# Text PostgreSQL cannot store, in every text column, and how it is stored.
ESCAPED = [
    ("path", "/\x00", "/\\x00"),
    ("path", "/v1/\ud800x", "/v1/\\ud800x"),
    ("model", "\x00", "\\x00"),
    ("model", "\ud800", "\\ud800"),
    ("username", "a\x00b", "a\\x00b"),
    ("key_id", "\udfff", "\\udfff"),
    ("error", "Unknown path /\x00.", "Unknown path /\\x00."),
    ("client_addr", "::1\x00", "::1\\x00"),
    ("engine", "http://e\ud83d", "http://e\\ud83d"),
    ("method", "GET\x00", "GET\\x00"),
    ("outcome", "ok\x00", "ok\\x00"),
]
POISONED_ID = ("poisoned-\x00-id", "poisoned-\\x00-id")
# A megabyte, cut to TEXT_LIMIT characters.
HUGE = [("path", "/" + "p" * MB), ("error", "\x00" * MB), ("model", "é" * MB)]
# Values PostgreSQL refuses whatever their text: their rows are set aside.
REFUSED: list[dict[str, Any]] = [
    {"prompt_tokens": 1 << 40},  # integer
    {"completion_tokens": -(1 << 40)},
    {"status": 1 << 33},
    {"method": None},  # NOT NULL
    {"bytes_in": 1 << 70},  # bigint
]


@pytest.fixture
async def pool(pg_database: PgDatabase) -> AsyncIterator[asyncpg.Pool]:
    made = await db.create_pool(pg_database.settings, pg_database.layout, durable_commits=False)
    try:
        yield made
    finally:
        await made.close()


def row(request_id: str, **values: Any) -> RequestRow:
    base = RequestRow(request_id, datetime.now(UTC), "POST", "/v1/chat/completions", "127.0.0.1")
    return dataclasses.replace(base, **{"status": 200, **values})


def poisoned_rows() -> list[RequestRow]:
    rows = [row(f"poisoned-{i}", **{column: value}) for i, (column, value, _) in enumerate(ESCAPED)]
    rows.append(row(POISONED_ID[0]))
    rows += [row(f"huge-{i}", **{column: value}) for i, (column, value) in enumerate(HUGE)]
    rows += [row(f"refused-{i}", **values) for i, values in enumerate(REFUSED)]
    return rows


async def count(pool: asyncpg.Pool, like: str) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM llama_requests WHERE request_id LIKE $1", like)
    )


async def stored(pool: asyncpg.Pool, like: str) -> dict[str, asyncpg.Record]:
    found = await pool.fetch("SELECT * FROM llama_requests WHERE request_id LIKE $1", like)
    return {r["request_id"]: r for r in found}


async def until_stored(pool: asyncpg.Pool, like: str, count: int) -> dict[str, asyncpg.Record]:
    """The rows written within 10 s (the writer writes every 0.05 s here)."""
    for _ in range(200):
        found = await stored(pool, like)
        if len(found) >= count:
            break
        await asyncio.sleep(0.05)
    return found


def set_aside(spool: Path) -> list[dict[str, Any]]:
    files = sorted((spool / "rejected").glob("*.jsonl"))
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def spool_file(spool: Path, name: str, rows: Iterable[RequestRow | str]) -> None:
    """A file of rows kept on disk, as a gateway writes them (before this change, with
    their text as it was)."""
    spool.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(as_json(r)) for r in rows]
    (spool / name).write_text("".join(line + "\n" for line in lines))


def as_json(r: RequestRow) -> dict[str, Any]:
    return {**dataclasses.asdict(r), "created_at": r.created_at.isoformat()}


async def test_poisoned_rows_among_good_ones_stop_nothing(
    pool: asyncpg.Pool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "request-log"
    requests = RequestLog(pool, spool, interval=0.05)
    await requests.start()
    poisoned = poisoned_rows()
    assert len(poisoned) == 20
    good = [row(f"good-{i}") for i in range(1000)]
    for i, r in enumerate(good):
        requests.add(r)
        if i % 50 == 7:  # the poisoned rows spread over both batches
            requests.add(poisoned[i // 50])
    try:
        assert len(await until_stored(pool, "good-%", 1000)) == 1000
        # Rows that come after them keep flowing, written by the writer's next batch.
        for i in range(10):
            requests.add(row(f"after-{i}"))
        assert len(await until_stored(pool, "after-%", 10)) == 10
    finally:
        await requests.close()

    escaped = await stored(pool, "poisoned-%")
    for i, (column, _, expected) in enumerate(ESCAPED):
        assert escaped[f"poisoned-{i}"][column] == expected
    assert POISONED_ID[1] in escaped
    huge = await stored(pool, "huge-%")
    for i, (column, value) in enumerate(HUGE):
        text = huge[f"huge-{i}"][column]
        assert len(text) == TEXT_LIMIT and text.endswith(f"...[cut: {len(value)} characters]")
    assert huge["huge-1"]["error"].startswith("\\x00\\x00")
    # The rows refused whatever their text: set aside on disk with why, each once, and
    # not in the spool's own files (which are retried).
    aside = set_aside(spool)
    assert sorted(a["row"]["request_id"] for a in aside) == [f"refused-{i}" for i in range(5)]
    assert all(a["reason"] for a in aside)
    assert not list(spool.glob("*.jsonl"))
    said = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(said) == 1, said  # once for the batch that held them (all rows came at once)


async def test_a_spooled_file_with_bad_rows_is_written_all_the_same(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    spool = tmp_path / "request-log"
    # Written by a gateway before this change: a NUL as it was, and a row refused anyway.
    spool_file(spool, "20260101-000000-1-a.jsonl", [
        *(row(f"kept-{i}") for i in range(10)),
        row("kept-nul", path="/\x00", model="\ud800"),
        row("kept-refused", prompt_tokens=1 << 40),
        *(row(f"kept-{i}") for i in range(10, 20)),
    ])  # fmt: skip
    spool_file(spool, "20260101-000001-1-b.jsonl", ["{not json"])  # cut short, say
    spool_file(spool, "20260101-000002-1-c.jsonl", [row(f"later-{i}") for i in range(5)])
    requests = RequestLog(pool, spool, interval=0.05)
    await requests.start()
    try:
        kept = await stored(pool, "kept-%")
        assert set(kept) == {f"kept-{i}" for i in range(20)} | {"kept-nul"}
        assert (kept["kept-nul"]["path"], kept["kept-nul"]["model"]) == ("/\\x00", "\\ud800")
        assert len(await stored(pool, "later-%")) == 5  # the files after it too
        moved = spool / "rejected" / "20260101-000001-1-b.jsonl"  # the file it could not read
        assert moved.read_text() == "{not json\n" and moved.stat().st_mode & 0o777 == 0o600
        moved.unlink()
        assert [a["row"]["request_id"] for a in set_aside(spool)] == ["kept-refused"]
        assert not list(spool.glob("*.jsonl"))  # none is retried for ever
        requests.add(row("next"))
        assert len(await until_stored(pool, "next", 1)) == 1
    finally:
        await requests.close()


class FailingPool:
    """The real pool, which stops answering after `answers` writes."""

    def __init__(self, pool: asyncpg.Pool, answers: int) -> None:
        self.pool, self.answers = pool, answers

    def acquire(self) -> Any:
        self.answers -= 1
        if self.answers < 0:
            raise ConnectionRefusedError("the database went away")
        return self.pool.acquire()


async def test_a_spooled_file_the_database_stops_taking_halfway_keeps_only_the_rest(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Halving a file around a bad row writes it in parts: the database going away after
    some of them leaves the file with the rows not written, none written twice."""
    spool = tmp_path / "request-log"
    rows = [row(f"part-{i}") for i in range(16)]
    rows[11] = row("part-refused", status=1 << 33)
    spool_file(spool, "20260101-000000-1-a.jsonl", rows)
    # 0-16 refused, 0-8 written, 8-16 and 8-12 refused, 8-10 written, 10-12 refused,
    # 10 written, 11 refused alone (set aside); then 12-16 meets the database gone.
    await RequestLog(FailingPool(pool, answers=8), spool).start()
    [left] = spool.glob("*.jsonl")
    unwritten = [json.loads(line)["request_id"] for line in left.read_text().splitlines()]
    assert unwritten == [f"part-{i}" for i in range(12, 16)]
    assert await count(pool, "part-%") == 11
    assert [a["row"]["request_id"] for a in set_aside(spool)] == ["part-refused"]

    requests = RequestLog(pool, spool)
    await requests.start()  # the database is back
    await requests.close()
    assert set(await stored(pool, "part-%")) == {f"part-{i}" for i in range(16) if i != 11}
    assert await count(pool, "part-%") == 15  # none twice
    assert not list(spool.glob("*.jsonl"))
