"""The request log: one `llama_requests` row per request the gateway answered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from operator import attrgetter
from typing import Any

import asyncpg


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
_record = attrgetter(*COLUMNS)  # a row's values in COLUMNS order (astuple deep-copies)


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
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit TO on")
        await conn.copy_records_to_table(
            "llama_requests", records=[_record(row) for row in rows], columns=COLUMNS
        )
