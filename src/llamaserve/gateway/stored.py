"""Stored responses: the Responses API's memory, kept by the gateway per user.

As OpenAI does by default, a response is stored (`store` true unless the request says
false), with the whole input it answered, in PostgreSQL (`store.responses`): any
gateway on the same database can continue it. `previous_response_id` continues a
stored response: the engines are stateless, so the gateway sends the engine the whole
conversation, the stored input and output followed by the new input (the previous
`instructions` are not carried over, as OpenAI does not). `GET` and `DELETE
/v1/responses/{id}` read and delete one. Another user's response, an expired one and an
unknown one are the same 404. Stored text is never written to the logs.

Responses expire after `LLAMA_PROXY_RESPONSES_TTL_DAYS`; each gateway purges expired
ones now and then. With `LLAMA_PROXY_STORE_RESPONSES=0` nothing is kept, and every
answer says `store: false`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from llamaserve.errors import InvalidRequest, NotFound
from llamaserve.gateway.db_status import database_errors
from llamaserve.store import responses

log = logging.getLogger("llamaserve.gateway")

PURGE_EVERY = 3600.0  # seconds between two purges of expired responses by a gateway


class StoredResponses:
    def __init__(self, pool: Any, *, enabled: bool, keep: timedelta) -> None:
        self.pool = pool
        self.enabled = enabled
        self.keep = keep
        self._purger: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.enabled:
            self._purger = asyncio.create_task(self._purge_now_and_then())

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger

    def keeps(self, body: dict[str, Any]) -> bool:
        """Whether a request's response is to be stored."""
        return self.enabled and body.get("store") is not False

    async def conversation(self, user_id: int, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The whole input of a Responses request: that of the response it continues
        (`previous_response_id`, then removed from the body), that response's output,
        and its own. The body's `input` becomes it."""
        items = input_items(body.get("input"))
        previous_id = body.pop("previous_response_id", None)
        if previous_id is not None:
            if not isinstance(previous_id, str):
                raise InvalidRequest(
                    "Invalid type for 'previous_response_id': expected a string.",
                    param="previous_response_id",
                )
            previous = await self._load(user_id, previous_id, param="previous_response_id")
            items = [*previous.input_items, *output_items(previous.response), *items]
        body["input"] = items
        return items

    async def save(
        self, user_id: int, items: list[dict[str, Any]], response: dict[str, Any]
    ) -> bool:
        """Keep a response; False (and a warning, without its text) if it could not be."""
        try:
            await responses.save(
                self.pool,
                response_id=response["id"],
                user_id=user_id,
                input_items=items,
                response=response,
                keep=self.keep,
            )
        except Exception as exc:
            log.warning("response %s was not stored: %s", response.get("id"), type(exc).__name__)
            return False
        return True

    async def get(self, user_id: int, response_id: str) -> dict[str, Any]:
        stored = await self._load(user_id, response_id)
        return stored.response

    async def delete(self, user_id: int, response_id: str) -> dict[str, Any]:
        with database_errors():
            deleted = await responses.delete(self.pool, response_id=response_id, user_id=user_id)
        if not deleted:
            raise not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def _load(
        self, user_id: int, response_id: str, param: str | None = None
    ) -> responses.Stored:
        with database_errors():
            stored = await responses.load(self.pool, response_id=response_id, user_id=user_id)
        if stored is None:
            raise not_found(response_id, param)
        return stored

    async def _purge_now_and_then(self) -> None:
        while True:
            try:
                purged = await responses.purge_expired(self.pool)
                if purged:
                    log.info("purged %d expired stored responses", purged)
            except Exception as exc:
                log.warning("purging expired stored responses failed: %s", exc)
            await asyncio.sleep(PURGE_EVERY)


def not_found(response_id: str, param: str | None = None) -> NotFound:
    """The one answer for a response that is not the caller's to see: unknown, expired,
    deleted or another user's."""
    return NotFound(f"Response with id '{response_id}' not found.", param=param)


def input_items(given: Any) -> list[dict[str, Any]]:
    """A request's `input` as a list of items (a string is one user message)."""
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    return list(given) if isinstance(given, list) else []


def output_items(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A response's output, as input items of the turn that continues it."""
    items = []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            texts = [
                part for part in item.get("content") or () if part.get("type") == "output_text"
            ]
            content = [{"type": "output_text", "text": part.get("text", "")} for part in texts]
            items.append({"type": "message", "role": "assistant", "content": content})
        elif item.get("type") == "function_call":
            items.append({key: item.get(key) for key in ("type", "call_id", "name", "arguments")})
    return items
