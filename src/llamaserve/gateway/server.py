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
import resource
import socket
from collections.abc import Iterator
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llamaserve.config import Layout, Settings
from llamaserve.errors import error_body
from llamaserve.gateway.app import Gateway

KEEP_ALIVE_SECONDS = 75  # as nginx's default
OPEN_FILES = 65536  # the soft limit the gateway asks for (a connection or two per request)

# A request's line and headers; more is refused before it is parsed whole (httptools
# holds a header until it ends, and uvicorn sets no bound). Real clients send a few KiB.
MAX_HEAD_BYTES = 64 * 1024


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, with bounds on a request's head, which uvicorn does
    not bound: one larger than MAX_HEAD_BYTES is refused with 431 as soon as that many
    bytes came without its end, and one not whole `header_timeout` seconds after the
    connection opened or the head began gets 408 (as nginx's client_header_timeout; a
    connection that sent nothing is closed without a word).
    Without them, a client that never ends its head holds its connection for ever, and
    enough of them hold every file the gateway may open."""

    header_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: int | None = 0  # bytes of the head so far; None once it is whole
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += len(data)
            self._await_head()
        super().data_received(data)
        if self._head is not None and self._head > MAX_HEAD_BYTES:
            message = f"The request's line and headers are larger than {MAX_HEAD_BYTES} bytes."
            self._refuse(431, "Request Header Fields Too Large", message,
                         "request_header_fields_too_large")  # fmt: skip

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_head()  # a pipelined request's, begun in the read that ended the last

    def on_headers_complete(self) -> None:
        self._head = None
        self._stop_head_timer()
        super().on_headers_complete()
        self.cycle.transport = cast(asyncio.Transport, _Corked(self.transport))  # its answer's

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0  # the next request's, on this connection

    def _await_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self._await_head()  # the answer before it is still going out: never cut it
            return
        if self._head == 0:  # not a byte of it: closed as an idle connection is
            self.transport.close()
            return
        message = f"The request's line and headers did not arrive within {self.header_timeout:g}s."
        self._refuse(408, "Request Timeout", message, "request_timeout")

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        """Answer in OpenAI's envelope and close the connection."""
        if self.transport.is_closing():
            return
        body = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason.encode(), len(body))
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
    _raise_open_files_limit()
    gateway = Gateway(settings, layout)

    class Protocol(_Protocol):
        header_timeout = settings.llama_proxy_header_timeout

    config = uvicorn.Config(
        gateway,
        host=settings.llama_proxy_host,
        port=settings.llama_proxy_port,
        loop="uvloop",
        http=Protocol,  # httptools
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


def _raise_open_files_limit() -> None:
    """Each connection (a client's, an engine's, the database's) is an open file, and a
    usual soft limit is 1024: raised to the hard limit, up to OPEN_FILES."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        logging.getLogger("llamaserve.gateway").warning(
            "open files limited to %d (could not raise it: %s)", soft, exc
        )
