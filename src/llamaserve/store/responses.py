"""Stored responses of the Responses API: one `llama_responses` row per response a client
asked to keep (`store`), for `previous_response_id` and GET/DELETE /v1/responses/{id}.

A response belongs to the user who made it: to anyone else it does not exist, as it does
not once it has expired (the caller answers 404 alike in every case). Expiry is reckoned
by the database's clock alone, as the rate limit is (store/limits.py), so that gateways
whose clocks disagree agree on what has expired. Deleting a user deletes theirs.

A text PostgreSQL's jsonb refuses is stored escaped, as in the request log
(store/requests.py): NUL (`\\u0000`, which jsonb cannot hold) as the four characters
`\\x00`, a lone surrogate (which JSON's `"\\ud800"` makes and UTF-8 cannot encode) as
`\\ud800`, in keys as in values. The escape is not undone: a conversation read back
holds the escaped text. Anything else that cannot be stored (NaN, a value JSON does not
know, a character the database's encoding lacks) raises InvalidValue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from llamaserve.store.errors import InvalidValue
from llamaserve.store.requests import escape, holdable

_SAVE = """
INSERT INTO llama_responses AS r (id, user_id, expires_at, input, response)
VALUES ($1, $2, now() + $3::interval, $4::jsonb, $5::jsonb)
ON CONFLICT (id) DO UPDATE
    SET user_id = excluded.user_id, created_at = now(), expires_at = excluded.expires_at,
        input = excluded.input, response = excluded.response
    WHERE r.user_id = excluded.user_id OR r.expires_at <= now()
RETURNING true
"""

# SKIP LOCKED: gateways purging at once take batches of their own instead of waiting.
_PURGE = """
WITH batch AS (
    SELECT id FROM llama_responses WHERE expires_at <= now()
    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
),
gone AS (DELETE FROM llama_responses r USING batch WHERE r.id = batch.id RETURNING 1)
SELECT count(*) FROM gone
"""


@dataclass(frozen=True)
class Stored:
    response_id: str
    input_items: list[Any]  # the whole conversation's input items, as sent to the engine
    response: dict[str, Any]  # the response object, as returned to the client
    created_at: datetime


async def save(
    pool: Any,
    *,
    response_id: str,
    user_id: int,
    input_items: list[dict[str, Any]],
    response: dict[str, Any],
    keep: timedelta,
) -> None:
    """Keep a response for `keep` from now, by the database's clock (with `keep` zero or
    less, it is stored expired already).

    Saving an id again replaces its row, as does saving the id of an expired row. The id
    of another user's live response raises InvalidValue and changes nothing (ids are the
    gateway's own, random: it means a bug). A user deleted meanwhile gets nothing stored.
    """
    if not holdable(response_id):
        raise InvalidValue(f"cannot store a response under the id {response_id!r}")
    values = (to_json(input_items), to_json(response))
    try:
        saved = await pool.fetchval(_SAVE, response_id, user_id, keep, *values)
    except asyncpg.ForeignKeyViolationError:
        return  # the user is gone, and would have taken their responses with them
    except asyncpg.PostgresError as exc:
        if not str(getattr(exc, "sqlstate", "")).startswith("22"):  # not a data exception
            raise
        raise InvalidValue(f"PostgreSQL cannot store response {response_id}: {exc}") from exc
    if not saved:
        raise InvalidValue(f"response id {response_id} belongs to another user")


async def load(pool: Any, *, response_id: str, user_id: int) -> Stored | None:
    """The user's live response of that id; None when unknown, expired or another's."""
    if not holdable(response_id):
        return None
    row = await pool.fetchrow(
        """SELECT input, response, created_at FROM llama_responses
           WHERE id = $1 AND user_id = $2 AND expires_at > now()""",
        response_id,
        user_id,
    )
    if row is None:
        return None
    return Stored(
        response_id, json.loads(row["input"]), json.loads(row["response"]), row["created_at"]
    )


async def delete(pool: Any, *, response_id: str, user_id: int) -> bool:
    """Delete the user's live response of that id; False when there is none to delete."""
    if not holdable(response_id):
        return False
    deleted = await pool.fetchval(
        """DELETE FROM llama_responses
           WHERE id = $1 AND user_id = $2 AND expires_at > now() RETURNING true""",
        response_id,
        user_id,
    )
    return bool(deleted)


async def purge_expired(pool: Any, limit: int = 10_000) -> int:
    """Delete every expired response, `limit` rows a statement (so that no transaction
    holds many rows' locks for long); how many were deleted."""
    if limit < 1:
        raise ValueError(f"purge_expired: limit must be 1 or more, not {limit}")
    purged = 0
    while True:
        batch: int = await pool.fetchval(_PURGE, limit)
        purged += batch
        if batch < limit:
            return purged


def to_json(value: Any) -> str:
    """JSON text jsonb accepts: the usual value (no NUL, no lone surrogate) as it is, in
    one pass; else with its text escaped (see the module's docstring)."""
    try:
        text = _dumps(value)
        if "\\u0000" in text or not holdable(text):  # a text "\\u0000" also comes here
            text = _dumps(_escaped(value))
    except (TypeError, ValueError) as exc:  # NaN, or what JSON does not know
        raise InvalidValue(f"cannot store as JSON: {exc}") from exc
    return text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, dict):
        return {_escape(k) if isinstance(k, str) else k: _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    return value


def _escape(text: str) -> str:
    """As the request log escapes text (store/requests.py), without its length bound."""
    return text if holdable(text) else escape(text)
