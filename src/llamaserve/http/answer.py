"""An answer as it goes out through ASGI's `send`, and the one way to end it with an error.

`Answer` knows whether the answer has started, whether it streams and whether it is
finished; `fail` says an error as far as it can still be said: the API's envelope with
its status before anything went out, a last error event in a stream that started
(then `[DONE]`, as OpenAI's SDK reads it). An answer on Anthropic's routes speaks
Anthropic's envelope and event (`errors.speaks_anthropic`). The gateway, both engines'
fronts and the stop of an engine all end their answers with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.types import Message, Send

from llamaserve.errors import APIError
from llamaserve.http import sse

Headers = list[tuple[bytes, bytes]]
STREAM_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Answer:
    """One request's answer. `headers` go with its start, whichever way it starts."""

    def __init__(
        self, send: Send, headers: Iterable[tuple[bytes, bytes]] = (), *, anthropic: bool = False
    ) -> None:
        self._send = send
        self.headers: Headers = list(headers)
        self.anthropic = anthropic  # errors in Anthropic's envelope and stream event
        self.status = 0
        self.started = False  # the status line has gone out
        self.streaming = False
        self.finished = False  # the last body message has gone out
        self.bytes_out = 0  # of the body

    async def send(self, message: Message) -> None:
        """ASGI's send, observed; an app's own messages pass through here."""
        # Noted before the send: one cut off while it goes out has gone out.
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streaming = content_type.startswith(sse.CONTENT_TYPE)
            self.status, self.started = message["status"], True
            if self.headers:
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
        elif message["type"] == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
            self.finished = not message.get("more_body", False)
        await self._send(message)

    async def start(self, status: int, headers: Headers) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def whole(self, status: int, content_type: bytes, body: bytes) -> None:
        """A whole answer, with its length (no chunked encoding)."""
        length = b"%d" % len(body)
        await self.start(status, [(b"content-type", content_type), (b"content-length", length)])
        await self.body(body, more=False)

    async def json(self, payload: Any, status: int = 200) -> None:
        await self.whole(status, b"application/json", json.dumps(payload).encode())

    async def event(self, payload: dict[str, Any]) -> None:
        """One event of a stream, which starts with the first."""
        if not self.started:
            await self.start(200, STREAM_HEADERS)
        await self.body(sse.event(payload))

    async def done(self) -> None:
        """The end of a stream: [DONE]."""
        if not self.started:
            await self.start(200, STREAM_HEADERS)
        await self.body(sse.DONE_EVENT, more=False)

    async def fail(self, error: APIError, status: int | None = None) -> None:
        """End the answer with `error`, as far as it can still be said (a whole answer
        that has started can only be cut)."""
        if self.finished:
            return
        if not self.started:
            body = json.dumps(error.body(self.anthropic)).encode()
            headers = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
            await self.start(
                status or error.status,
                [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    *headers,
                ],
            )
            await self.body(body, more=False)
        elif self.streaming:
            await self.body(sse.error_events(error, anthropic=self.anthropic), more=False)


async def send_json(send: Send, payload: Any, status: int = 200) -> None:
    """A whole JSON answer."""
    await Answer(send).json(payload, status)


async def send_error(
    send: Send,
    error: APIError,
    *,
    status: int | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    anthropic: bool = False,
) -> None:
    """Answer a request with the error's envelope."""
    await Answer(send, headers, anthropic=anthropic).fail(error, status)
