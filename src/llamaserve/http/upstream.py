"""The one HTTP client to upstream servers: the gateway's to its engines, and the
llama-server front's to llama-server. Every network and upstream failure is mapped to
the error family here, and nowhere else.

A small HTTP/1.1 client made for this one job: requests to servers we know, whose
answers are relayed as they come. Requests go out on keep-alive connections of the
event loop's own transports, with the server's key, and answers are parsed by httptools
(the parser uvicorn serves with). The general clients cost several times more per
request: aiohttp took 155 to 200 µs of CPU per round trip where this takes 40 to 70
(sequential round trips to the benchmark's mock engine), on the one thread that runs
every request of the gateway.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
from pydantic import SecretStr

from llamaserve.config import is_engine_url
from llamaserve.errors import (
    InvalidRequest,
    ServiceUnavailable,
    UpstreamFailed,
    UpstreamTimeout,
)

# Idle connections are dropped before the server's own keep-alive timeout (5 s for
# uvicorn and llama-server), so that a request seldom goes out on a connection the
# server is closing; one that does is sent again on a new connection (see `_Stale`).
KEEPALIVE_SECONDS = 3.0
CONNECT_SECONDS = 5.0
# An answer buffered beyond this (a client reading slower than the engine writes)
# stops reading from the engine until half of it has been relayed.
HIGH_WATER = 256 * 1024
# What a request line's method and target may hold: a token, and printable ASCII
# without spaces starting with '/'. Anything else (a decoded CR/LF, a space) would let
# one client's path write a second request, with the engine's key, on the connection.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a request's name for its tally
_METHOD = re.compile(r"[A-Z]+")
_TARGET = re.compile(r"/[!-~]*")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def why(exc: OSError) -> str:
    """Why a connection failed, as the system says it: "Connection refused" (asyncio's
    own loop words it "Connect call failed (address)", uvloop as the system does)."""
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


class _Stray(Exception):
    """Bytes after a whole answer: never read as another request's answer."""


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: the server closed it
    as idle, so it never took the request, which may be sent again."""


@dataclass(frozen=True)
class _Origin:
    """Where an engine URL points: its host and port, TLS, Host header and path prefix."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    authority: bytes  # the Host header
    prefix: str  # the URL's own path, before each request's

    @classmethod
    def of(cls, url: str) -> _Origin:
        if not is_engine_url(url):  # console.sh start refuses it; a hand-made start may not
            raise ServiceUnavailable(f"The engine URL {url!r} is not an http(s) URL.")
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        host = parts.hostname or ""
        authority = f"[{host}]" if ":" in host else host  # an IPv6 address
        if parts.port:
            authority += f":{parts.port}"
        port = parts.port or (443 if secure else 80)
        context = ssl.create_default_context() if secure else None
        prefix = parts.path.rstrip("/")
        return cls(host, port, context, authority.encode("idna"), prefix)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one request at a time."""

    def __init__(self, name: str) -> None:
        self.name = name  # of the server, in errors
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._begin()

    def _begin(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.in_use = False
        self.status = 0  # set when the headers are complete
        self.content_type = ""
        self._framed = False  # the body's length is known (else it ends with the connection)
        self._received = False
        self._interim = False
        self._complete = False
        self._keep_alive = False  # read as the answer completes: the parser then forgets
        self._error: Exception | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._begin()
        self.in_use = True
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return self._complete and self._error is None and not self.closed and self._keep_alive

    # What the relay awaits. `timeout` bounds each wait for the engine, not the whole.

    async def headers(self, timeout: float | None) -> None:
        while not self.status:
            await self._next(timeout)

    async def read(self, timeout: float | None) -> bytes:
        while not self._complete:
            await self._next(timeout)
        return self._take()

    async def chunks(self, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield self._take()
            elif self._complete:
                return
            else:
                await self._next(timeout)

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def _next(self, timeout: float | None) -> None:
        """Wait for the next thing the server sends, or its failure."""
        if self._error is None:
            self._waiter = self._loop.create_future()
            timer = None if timeout is None else self._loop.call_later(timeout, self._timed_out)
            try:
                await self._waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self._complete:
            self._error = error
            self._wake()
        self.close()

    def _timed_out(self) -> None:
        self._fail(UpstreamTimeout(f"{self.name} did not answer in time."))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # nothing is expected on an idle connection
            self.close()
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # After a whole answer (bytes that follow it), only the connection goes.
            self._fail(UpstreamFailed(f"{self.name}'s answer is not valid HTTP ({exc})."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.in_use or self._complete:
            return
        if self.status and not self._framed:
            self.on_message_complete()  # a body without a length ends with the connection
        elif self.reused and not self._received:
            self._fail(_Stale())
        else:
            self._fail(UpstreamFailed(f"{self.name} closed the connection mid-answer."))

    # httptools' callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1").partition(";")[0].strip().lower()
        elif name in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_message_begin(self) -> None:
        if self._complete:  # bytes after the answer: stop parsing, close the connection
            raise _Stray

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # interim (103 Early Hints...): the answer follows it
            self._interim = True
            self.content_type, self._framed = "", False
            return
        self.status = status
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()


class Reply:
    """An engine's answer whose body may still be arriving."""

    def __init__(self, connection: _Connection, timeout: float | None) -> None:
        self.status = connection.status
        self.content_type = connection.content_type
        self._connection = connection
        self._timeout = timeout

    async def read(self) -> bytes:
        return await self._connection.read(self._timeout)

    def chunks(self) -> AsyncIterator[bytes]:
        return self._connection.chunks(self._timeout)


class Upstream:
    """Pooled keep-alive connections to upstream servers, each request with their key.
    `read_timeout` bounds each wait for the server (None: no bound)."""

    def __init__(
        self,
        engine_key: SecretStr | None,
        read_timeout: float | None,
        connect_timeout: float = CONNECT_SECONDS,
        *,
        name: str = "The engine",
    ) -> None:
        self._name = name  # of the servers, in errors
        self._auth = None  # no key: no Authorization header
        if engine_key is not None:
            self._auth = b"Bearer " + engine_key.get_secret_value().encode("latin-1")
            if _CONTROL.search(self._auth):
                raise ValueError("The engine's key holds a control character.")
        self._timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[str, deque[_Connection]] = {}  # by engine URL, the newest last
        self._closing = False

    async def open(self) -> None:
        self._closing = False

    async def close(self) -> None:
        self._closing = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    @asynccontextmanager
    async def send(
        self, url: str, method: str, path: str, body: bytes = b"", *, tally: str | None = None
    ) -> AsyncIterator[Reply]:
        """Send a request; the reply is released (and the engine told, if unfinished) on exit.
        `tally`: the request's name, under which the engine keeps its count of the
        request's tokens for the gateway to read (`engine/tally.py`)."""
        origin = self._origins.get(url) or self._origins.setdefault(url, _Origin.of(url))
        request = self._request(origin, method, path, body, tally)
        connection = await self._exchange(url, origin, request)
        try:
            yield Reply(connection, self._timeout)
        finally:
            self._release(url, connection)

    def _request(
        self, origin: _Origin, method: str, path: str, body: bytes, tally: str | None = None
    ) -> bytes:
        """The request's bytes, from parts checked first: nothing is written otherwise."""
        target = origin.prefix + path
        if not (_METHOD.fullmatch(method) and _TARGET.fullmatch(target)):
            raise InvalidRequest(f"The request's path cannot be forwarded: {path!r}.")
        head = [f"{method} {target} HTTP/1.1".encode("ascii"), b"Host: " + origin.authority]
        if self._auth is not None:
            head.append(b"Authorization: " + self._auth)
        if tally is not None and _NAME.fullmatch(tally):
            head.append(b"X-Llamaserve-Tally: " + tally.encode("ascii"))
        if body or method == "POST":
            head.append(b"Content-Type: application/json")
            head.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(head) + b"\r\n\r\n" + body

    async def _exchange(self, url: str, origin: _Origin, request: bytes) -> _Connection:
        """The connection whose answer's headers have come. A request that met a
        connection the engine had just closed as idle goes again on a new one."""
        while True:
            connection = self._pooled(url) or await self._connect(origin)
            connection.send(request)
            try:
                await connection.headers(self._timeout)
                return connection
            except _Stale:
                continue
            except BaseException:  # an error, or cancelled: the engine sees the client go
                connection.close()
                raise

    def _pooled(self, url: str) -> _Connection | None:
        idle = self._idle.get(url)
        while idle:
            connection = idle.pop()
            fresh = time.monotonic() - connection.idle_since < KEEPALIVE_SECONDS
            if fresh and not connection.closed:
                connection.reused = True
                return connection
            connection.close()
        return None

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._name), origin.host, origin.port, ssl=origin.ssl
                )
        except TimeoutError:
            reason = f"no connection within {self._connect_timeout:g}s"
            raise ServiceUnavailable(f"{self._name} is not reachable ({reason}).") from None
        except OSError as exc:
            raise ServiceUnavailable(f"{self._name} is not reachable ({why(exc)}).") from exc
        return connection

    def _release(self, url: str, connection: _Connection) -> None:
        """Keep a connection whose answer was read whole; close any other, so that an
        engine still generating sees its client go away and stops."""
        if self._closing or not connection.reusable:
            connection.close()
            return
        connection.in_use = False
        now = connection.idle_since = time.monotonic()
        idle = self._idle.setdefault(url, deque())
        while idle and (idle[0].closed or now - idle[0].idle_since >= KEEPALIVE_SECONDS):
            idle.popleft().close()
        idle.append(connection)
