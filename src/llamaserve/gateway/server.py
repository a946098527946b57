"""Runs the gateway under uvicorn (`llamaserve serve-gateway`).

One process and one thread: uvicorn parses HTTP with httptools on the uvloop event loop
that runs the gateway, so a request never waits for a hand-off between threads (the
fair queue and the engines' slots are one process's state). Figures in the README's
"Process".

On SIGTERM (`console.sh stop`) or SIGINT uvicorn stops taking connections and waits for
the requests in flight; the gateway gives them `Settings.stop_grace` seconds, then ends
those still going with a clear error (`Gateway.begin_stop`), so that none is cut off
silently, and each has its row. uvicorn's own graceful timeout is only the last resort.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from collections.abc import Iterator
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llamaserve.config import Layout, Settings
from llamaserve.errors import error_body
from llamaserve.gateway.app import Gateway

KEEP_ALIVE_SECONDS = 75  # as nginx's default


# A request's line and headers; more is refused before it is parsed whole (httptools
# holds a header until it ends, and uvicorn sets no bound). Real clients send a few KiB.
MAX_HEAD_BYTES = 64 * 1024


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, refusing with 431 a request whose head is larger than
    MAX_HEAD_BYTES, as soon as that many bytes came without its end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: int | None = 0  # bytes of the head so far; None once it is whole

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += len(data)
        super().data_received(data)
        if self._head is not None and self._head > MAX_HEAD_BYTES:
            self._refuse_head()

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()
        self.cycle.transport = cast(asyncio.Transport, _Corked(self.transport))  # its answer's

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0  # the next request's, on this connection

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return
        message = f"The request's line and headers are larger than {MAX_HEAD_BYTES} bytes."
        body = json.dumps(
            error_body(message, "invalid_request_error", code="request_header_fields_too_large")
        ).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()


class _Corked:
    """A transport whose writes in one turn of the event loop go out as one: uvicorn
    writes an answer's status line and headers at once, then its body, which made two
    sends (and two wake-ups of the client) of every answer."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._gateway.begin_stop()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # The stop a signal asked for is done: exit 0, not by the signal raised again
            # (uvicorn's way, for programs that embed it).
            self._captured_signals.clear()


def serve(settings: Settings, layout: Layout) -> None:
    """Serve until stopped. A gateway that cannot start (its database, its port) logs
    why and exits with uvicorn's status 3 (1 for a port it cannot bind)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(
        f"llamaserve gateway: {settings.llama_proxy_host}:{settings.llama_proxy_port} -> "
        f"{settings.llama_server_backend_url}",
        flush=True,
    )
    gateway = Gateway(settings, layout)
    config = uvicorn.Config(
        gateway,
        host=settings.llama_proxy_host,
        port=settings.llama_proxy_port,
        loop="uvloop",
        http=_Protocol,  # httptools
        ws="none",  # no WebSocket: an upgrade is an ordinary request, refused as such
        lifespan="on",  # pools, clients, background tasks; a failed startup stops it
        log_level="warning",
        access_log=False,  # the gateway writes its own line per request, without secrets
        # The client address logged is the connection's: an X-Forwarded-For from a local
        # client is not believed (uvicorn's default trusts it from 127.0.0.1).
        proxy_headers=False,
        server_header=False,
        # Idle client connections stay open longer than clients keep them (httpx, the
        # OpenAI SDK's client: 5 s; aiohttp: 15 s), so that a client never sends a
        # request on a connection the gateway is closing as idle (uvicorn's default: 5 s).
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        # The gateway ends what is still in flight after its grace and writes the rows;
        # this is the last resort, before `console.sh stop`'s SIGKILL.
        timeout_graceful_shutdown=max(1, math.ceil(settings.llama_stop_timeout) - 1),
    )
    _Server(config, gateway).run()
