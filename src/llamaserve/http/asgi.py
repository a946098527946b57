"""ASGI's side of a request: its headers, its body, its client going away, its
`x-request-id`, and the lifespan of an app."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.errors import RequestTooLarge


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a header (`name` in lower case)."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def read_body(receive: Receive, scope: Scope | None = None, limit: int = 0) -> bytes:
    """The request's body; beyond `limit` bytes (0: no limit) a 413, refused on its
    declared length before any of it is read."""
    if limit and scope is not None:
        declared = header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if limit and len(body) > limit:
            raise _too_large(limit)
        if not message.get("more_body"):
            return bytes(body)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than {limit} bytes.")


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (its body read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(work: Coroutine[Any, Any, None], receive: Receive) -> None:
    """Run `work` until it ends or the client goes away, whichever comes first (`work`
    answers its own errors)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


Hook = Callable[[], Awaitable[None]]


async def lifespan(receive: Receive, send: Send, startup: Hook, shutdown: Hook) -> None:
    """ASGI's lifespan protocol: a startup that fails is reported and stops the server."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


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


def with_body(scope: Scope, body: bytes, original: Receive) -> tuple[Scope, Receive]:
    """The request with another JSON `body`, for an app inside ours: its framing headers
    rewritten (JSON whatever type the client named: llama_cpp read a text/plain body as
    no JSON at all, a 500), then the client's own messages (its disconnect)."""
    framing = (b"content-length", b"content-type")
    headers = [(k, v) for k, v in scope["headers"] if k not in framing]
    headers += [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
    ]
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            # The body was read already: the next message from the server is the disconnect.
            return await original()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return {**scope, "headers": headers}, receive
