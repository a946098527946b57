"""The request log: one `llama_requests` row per request the gateway answered.

Any row can be stored. A text value PostgreSQL refuses is stored escaped, as Python's
`backslashreplace` writes it: NUL (which a text column cannot hold) as the four
characters `\\x00`, a lone surrogate (which JSON's `"\\ud800"` makes and UTF-8 cannot
encode) as `\\ud800`. The escape is for reading, not undone: a value that held those
characters themselves reads the same. Every text value is also bounded to TEXT_LIMIT
characters: a longer one keeps its beginning and ends with `...[cut: N characters]`, N
its whole length (a path from a client without a key can be 64 KiB; an error from an
engine, any size). A usual row (its text short, ASCII, without NUL) is checked in one
pass over its text joined, and stored as it is.

What PostgreSQL still refuses (a value out of its column's range, a database whose
encoding lacks a character) is told apart from a database that cannot answer by
`refused_for_data`: the writer then sets only the rows refused aside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from operator import attrgetter
from typing import Any

import asyncpg

TEXT_LIMIT = 4096  # characters of one stored text value, its cut mark included


@dataclass
class RequestRow:
    request_id: str
    created_at: datetime
    method: str
    path: str
    client_addr: str | None
    status: int = 0
    outcome: str = "ok"  # ok | error | rejected | cancelled
    user_id: int | None = None
    username: str | None = None
    key_id: str | None = None
    model: str | None = None
    stream: bool = False
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    queue_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    engine: str | None = None  # the URL of the engine it was sent to


COLUMNS = tuple(f.name for f in fields(RequestRow))
TEXT_COLUMNS = tuple(f.name for f in fields(RequestRow) if str(f.type).startswith("str"))
_record = attrgetter(*COLUMNS)  # a row's values in COLUMNS order (astuple deep-copies)
_texts = attrgetter(*TEXT_COLUMNS)


def storable(row: RequestRow) -> RequestRow:
    """The row as PostgreSQL can store it: the row itself, unless a text value had to be
    escaped or cut (see the module's docstring)."""
    if _usual(row):
        return row
    changed: dict[str, Any] = {}
    for name in TEXT_COLUMNS:
        value = getattr(row, name)
        if isinstance(value, str) and not _fits(value):
            changed[name] = storable_text(value)
    return replace(row, **changed) if changed else row


def _usual(row: RequestRow) -> bool:
    """Whether the row's text, all together, is short, ASCII and without NUL: the usual
    row, checked in one pass rather than value by value."""
    try:
        text = "".join(filter(None, _texts(row)))
    except TypeError:  # a value that is not text: asyncpg will say what it makes of it
        return False
    return len(text) <= TEXT_LIMIT and text.isascii() and "\x00" not in text


def storable_text(value: str) -> str:
    """`value` escaped and bounded; the same text again when it was already storable."""
    if _fits(value):
        return value
    text = escape(value[:TEXT_LIMIT])
    if len(value) > TEXT_LIMIT or len(text) > TEXT_LIMIT:
        mark = f"...[cut: {len(value)} characters]"
        text = text[: TEXT_LIMIT - len(mark)] + mark
    return text


def _fits(value: str) -> bool:
    return len(value) <= TEXT_LIMIT and holdable(value)


def holdable(text: str) -> bool:
    """Whether PostgreSQL can hold the text as it is: no NUL, and UTF-8 can encode it."""
    if "\x00" in text:
        return False
    if text.isascii():  # a flag of the string: no scan
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def escape(text: str) -> str:
    """Text PostgreSQL can hold: NUL as the characters `\\x00`, a lone surrogate as
    `\\ud800` (the request log's, and the stored responses')."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def refused_for_data(exc: BaseException) -> bool:
    """Whether a write failed for what its rows hold, so that it would fail again with
    them and succeed without them: PostgreSQL's data exceptions (class 22: a value out
    of range, a character its encoding lacks) and constraint violations (class 23), or a
    value asyncpg cannot encode (its DataError is a ValueError). Not a database or a
    connection that cannot answer, nor a statement it refuses whatever the rows."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "")).startswith(("22", "23"))
    return isinstance(exc, ValueError | TypeError | OverflowError)


async def insert_requests(pool: Any, *, rows: Sequence[RequestRow]) -> None:
    """Write a batch of rows in one COPY, durably even on a pool that commits lazily.

    A user deleted while their request was in flight is no longer there to reference:
    their rows are kept like those of any deleted user, with user_id NULL.
    """
    async with pool.acquire() as conn:
        try:
            await _copy(conn, rows)
        except asyncpg.ForeignKeyViolationError:
            ids = list({row.user_id for row in rows if row.user_id is not None})
            found = {r["id"] for r in await conn.fetch(_EXISTING_USERS, ids)}
            await _copy(conn, [r if r.user_id in found else replace(r, user_id=None) for r in rows])


_EXISTING_USERS = "SELECT id FROM users WHERE id = ANY($1::bigint[])"


async def _copy(conn: Any, rows: Sequence[RequestRow]) -> None:
    records = [_record(storable(row)) for row in rows]
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit TO on")
        await conn.copy_records_to_table("llama_requests", records=records, columns=COLUMNS)
