"""What both engines' fronts put into their answers where the engines leave out what
OpenAI's API has: a chat answer's `refusal` and a model's `created`, which its
description requires, and an `x-request-id` on every answer, as OpenAI and the gateway
send; and a model's `owned_by`, the same whichever engine serves it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A listed model's owner: this server, on both engines (llama-server said "llamacpp",
# llama_cpp "me"), so that a client sees one listing whichever engine runs.
OWNED_BY = "llamaserve"


def with_refusal(choice: dict[str, Any]) -> dict[str, Any]:
    """A chat choice with the `refusal` OpenAI's schema requires, null (these models do
    not refuse through it): in a whole answer's `message` and in a `logprobs` object,
    streamed or not. A stream's `delta` does not require it; a token's entry has none."""
    message = choice.get("message")
    if isinstance(message, dict):
        message.setdefault("refusal", None)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        logprobs.setdefault("refusal", None)
    return choice


def model_list(listing: dict[str, Any], created: int) -> dict[str, Any]:
    """An engine's `/v1/models` as OpenAI's, with `created` the model file's time:
    llama-server says the time of the call, and llama_cpp nothing; and `OWNED_BY`."""
    data = [
        {
            "id": model.get("id"),
            "object": "model",
            "created": created,
            "owned_by": OWNED_BY,
        }
        for model in listing.get("data", [])
        if isinstance(model, dict)
    ]
    return {"object": "list", "data": data}


class RequestIds:
    """ASGI middleware: every answer carries an `x-request-id` of its own, never a
    client's: llama_cpp.server answered with the id a request sent (the same on every
    request that sends it) and refused one that is no UUID."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (b"x-request-id", uuid.uuid4().hex.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*_without_id(message.get("headers", ())), header]
                message = {**message, "headers": headers}
            await send(message)

        await self.app({**scope, "headers": _without_id(scope["headers"])}, receive, send_with_id)


def _without_id(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name.lower() != b"x-request-id"]
