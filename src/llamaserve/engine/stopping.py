"""How an engine stops with requests in flight (`console.sh stop`, SIGTERM).

uvicorn stops taking connections and waits for the requests in flight. They get
`Settings.stop_grace` seconds; then those still going are ended with a clear error,
not cut: one whose answer has not begun gets 503 (`server_stopping`), a stream a last
error event and `[DONE]`. Ending a request cancels its task, which closes what it
generates from (llama-server's stream, or llama_cpp's generator).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.engine.answers import RequestIds
from llamaserve.errors import send_error, server_stopping, sse_error_event
from llamaserve.heads import bounded_heads


class _InFlight:
    """One request's answer as it goes out, and its task."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.task = asyncio.current_task()
        self.started = self.streaming = self.finished = False
        self.cut = False

    async def send(self, message: Message) -> None:
        # Noted before the send: one cut off while it goes out has gone out.
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.finished = True
        await self._send(message)

    async def end(self) -> None:
        """End the answer with the stop's error, as far as it can still be said."""
        error = server_stopping()
        if not self.started:
            await send_error(self._send, error)
        elif self.streaming and not self.finished:
            await self._send({"type": "http.response.body", "body": sse_error_event(error)})


class EndOnStop:
    """The ASGI middleware that ends the requests still going when the grace is over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._in_flight: set[_InFlight] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _InFlight(send)
        self._in_flight.add(request)
        try:
            await self.app(scope, receive, request.send)
        except asyncio.CancelledError:
            if not request.cut:
                raise
            await request.end()
        finally:
            self._in_flight.discard(request)

    def cut_off(self) -> None:
        for request in self._in_flight:
            if request.task is not None:
                request.cut = True
                request.task.cancel()


class Server(uvicorn.Server):
    """uvicorn's server, which gives the requests in flight `grace` seconds at stop and
    then has `ending` end them; its own graceful timeout is only the last resort."""

    def __init__(self, config: uvicorn.Config, ending: EndOnStop, grace: float) -> None:
        super().__init__(config)
        self._ending = ending
        self._grace = grace

    async def shutdown(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().call_later(self._grace, self._ending.cut_off)
        await super().shutdown(sockets)


def serve(
    app: ASGIApp, *, host: str, port: int, grace: float, header_timeout: float
) -> uvicorn.Server:
    """The server for an engine's front `app` (not yet running)."""
    ending = EndOnStop(app)
    config = uvicorn.Config(
        RequestIds(ending),  # outside: the stop's own answers get their id too
        host=host,
        port=port,
        http=bounded_heads(header_timeout),  # httptools, heads bounded (see heads.py)
        # The access log names the connection's address: an X-Forwarded-For from a local
        # client is not believed (uvicorn's default trusts it from 127.0.0.1).
        proxy_headers=False,
        log_level="info",
        timeout_graceful_shutdown=int(grace) + 2,
    )
    logging.getLogger("uvicorn.access").addFilter(_without_health_probes)  # after its setup
    return Server(config, ending, grace)


def _without_health_probes(record: logging.LogRecord) -> bool:
    """The access log without the gateways' health probes that succeed (one every
    LLAMA_PROXY_HEALTH_INTERVAL seconds from each: 43,200 lines a day at the default);
    a probe that fails is still logged."""
    args = record.args  # uvicorn's: client, method, path, HTTP version, status
    return not (isinstance(args, tuple) and len(args) == 5 and args[2] == "/health"
                and args[4] == 200)  # fmt: skip
