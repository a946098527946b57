"""Everything that reaches into uvicorn's internals, for the gateway and the engines:
the only code its version pin (pyproject) covers.

- `BoundedHeads`: uvicorn's httptools protocol with bounds on a request's head.
- `CorkedHeads`: the same, each answer's writes in one turn of the event loop joined.
- `Server`: uvicorn's server, whose stop gives the requests in flight their grace
  (`InFlight.begin`).
- `without_health_probes`: uvicorn's access log without the probes that succeed.

Bounds on a request's head (its line and headers): uvicorn sets none under httptools, a
header is held until it ends, and a client that never ends its head holds its connection
for ever (enough of them hold every file the process may open).

A head larger than MAX_HEAD_BYTES is refused with 431 as soon as that many bytes came
without its end, however the client cut its writes; one not whole `header_timeout`
seconds after the connection opened or the head began gets 408 (as nginx's
client_header_timeout), and a connection that sent nothing by then is closed without a
word. A head uvicorn cannot parse is a 400. Each answer is in OpenAI's envelope, and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llamaserve.errors import error_body
from llamaserve.http.stopping import InFlight

# Real clients send a few KiB.
MAX_HEAD_BYTES = 64 * 1024


class BoundedHeads(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools), with a request's head bounded in size and
    in time; `bounded_heads` makes one with its timeout."""

    header_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: int | None = 0  # bytes of the head so far; None once it is whole
        self._begun = False  # a request began and its head is not whole yet
        self._heads_ended = 0  # on this connection
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head is not None and self._head + len(data) > MAX_HEAD_BYTES:
            self._beyond_bound(memoryview(data))
            return
        if self._head is not None:
            self._head += len(data)
        super().data_received(data)
        if self._head is not None and (self._head or self._begun):
            # Part of a head came, not its end. Looked at after parsing, so that a head
            # whole in one read (the usual case) costs no timer.
            self._await_head()

    def _beyond_bound(self, data: memoryview) -> None:
        """More came than a head may hold: the bytes up to the bound are parsed, and the
        head must end among them, however the client cut its writes (a whole head in one
        read was parsed before it could be measured)."""
        assert self._head is not None
        room = MAX_HEAD_BYTES - self._head
        ended = self._heads_ended
        self.data_received(data[:room])  # type: ignore[arg-type]
        if self.transport.is_closing():  # refused as malformed meanwhile
            return
        if self._heads_ended == ended:
            message = f"The request's line and headers are larger than {MAX_HEAD_BYTES} bytes."
            self._refuse(431, "Request Header Fields Too Large", message,
                         "request_header_fields_too_large")  # fmt: skip
        else:
            self.data_received(data[room:])  # type: ignore[arg-type]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse (a NUL or a bare LF in a header, a
        byte outside ASCII in the path...), in OpenAI's envelope rather than plain text."""
        self._refuse(400, "Bad Request", msg, "invalid_http_request")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True

    def on_headers_complete(self) -> None:
        self._head = None
        self._heads_ended += 1
        self._begun = False
        self._stop_head_timer()
        super().on_headers_complete()

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


def bounded_heads(
    header_timeout: float, base: type[BoundedHeads] = BoundedHeads
) -> type[BoundedHeads]:
    """`base` with its heads due within `header_timeout` seconds, for uvicorn's `http`."""
    return type(base.__name__, (base,), {"header_timeout": header_timeout})


class CorkedHeads(BoundedHeads):
    """uvicorn's HTTP/1.1 protocol with bounded heads, each answer's writes joined."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.cycle.transport = cast(asyncio.Transport, _Corked(self.transport))  # its answer's


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


class Server(uvicorn.Server):
    """uvicorn's server. At its stop the requests in flight get `grace` seconds (then
    `in_flight` ends them); its own graceful timeout is only the last resort. With
    `exit_zero`, a stop asked for by a signal exits 0 rather than by the signal raised
    again (uvicorn's way, for programs that embed it)."""

    def __init__(
        self, config: uvicorn.Config, in_flight: InFlight, grace: float, *, exit_zero: bool
    ) -> None:
        super().__init__(config)
        self.in_flight = in_flight
        self._grace = grace
        self._exit_zero = exit_zero

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.in_flight.begin(self._grace)
        try:
            await super().shutdown(sockets)
        finally:
            self.in_flight.close()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            if self._exit_zero:
                self._captured_signals.clear()


def without_health_probes(record: logging.LogRecord) -> bool:
    """uvicorn's access log without the gateways' health probes that succeed (one every
    LLAMA_PROXY_HEALTH_INTERVAL seconds from each: 43,200 lines a day at the default);
    a probe that fails is still logged."""
    args = record.args  # uvicorn's: client, method, path, HTTP version, status
    return not (isinstance(args, tuple) and len(args) == 5 and args[2] == "/health"
                and args[4] == 200)  # fmt: skip
