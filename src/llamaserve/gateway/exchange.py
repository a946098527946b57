"""The life of one proxied request: route, body, key, rate limit, a fair slot of an
engine, the relay of its answer, and the request's row in `llama_requests`.

A request whose admission the gateway expects to pass (see `Admissions`) goes to the
engine while the database decides; the answer's first byte waits for the decision,
and a refusal cancels the engine's work at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.types import Message, Receive, Scope, Send

from llamaserve.bodies import parse_object
from llamaserve.engine.protocol import check_request
from llamaserve.errors import (
    APIError,
    AuthenticationFailed,
    InternalError,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
    UpstreamFailed,
    openai_error,
    send_error,
    server_stopping,
    sse_error_event,
)
from llamaserve.gateway.admission import (
    rate_limit_headers,
    refuse_unless_usable,
)
from llamaserve.gateway.db_status import database_errors
from llamaserve.gateway.scheduling import EngineState
from llamaserve.gateway.streaming import (
    DONE,
    EventSplitter,
    event_data,
    has_output,
    is_usage_only,
    parse_chunk,
)
from llamaserve.gateway.upstream import Reply
from llamaserve.routes import check_route
from llamaserve.store import limits
from llamaserve.store.limits import Admission
from llamaserve.store.requests import RequestRow

if TYPE_CHECKING:
    from llamaserve.gateway.app import Gateway

log = logging.getLogger("llamaserve.gateway")

RETRYABLE = frozenset({502, 503, 504})  # the engine could not take the request
# A request that waited this long (seconds) in the queue checks its key again as it
# leaves: a key revoked meanwhile is refused. Shorter waits skip the round trip.
RECHECK_AFTER = 1.0
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Exchange:
    """One proxied request."""

    def __init__(self, gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
        self.gateway = gateway
        self.scope = scope
        self.receive = receive
        self._send = send
        self.began = time.perf_counter()
        client = scope.get("client")
        self.row = RequestRow(
            request_id=uuid.uuid4().hex,
            created_at=datetime.now(UTC),
            method=scope["method"],
            path=scope["path"],
            client_addr=client[0] if client else None,
        )
        self.headers: list[tuple[bytes, bytes]] = [(b"x-request-id", self.row.request_id.encode())]
        self.started = False  # the response's status line has gone out
        self.streaming = False
        self._admission: asyncio.Future[Admission | None] | None = None  # until settled
        self._cleared = asyncio.Event()  # the admission is settled: `_refused` says how
        self._refused = False
        self._relay: asyncio.Future[None] | None = None

    async def run(self) -> None:
        try:
            await self._serve()
        except APIError as error:
            await self._fail(error)
        except Exception as exc:
            log.exception("request %s failed", self.row.request_id)
            await self._fail(InternalError(f"Internal error ({type(exc).__name__})."))
        finally:
            self._finish()

    async def _serve(self) -> None:
        check_route(self.row.path, self.row.method)  # never an engine's /slots, /props...
        # The key before the body: a client without a valid one never has its body read
        # (up to LLAMA_PROXY_MAX_BODY_BYTES). The admission after it: submitted before,
        # the benchmark's overhead at 32 clients grew by a few tenths of a millisecond.
        authorization = _header(self.scope, b"authorization")
        self.row.key_id = await self.gateway.auth.authenticate(authorization)
        try:
            body = await self._read_body()
        except RequestTooLarge:  # the user's request all the same: counted, logged as theirs
            await self._admit(self.row.key_id)
            raise
        self.row.bytes_in = len(body)
        await self._admit(self.row.key_id)
        stream, wants_usage = False, False
        if self.row.method == "POST":
            body, stream, wants_usage = self._prepare(body)
        await self._forward(body, stream, wants_usage)

    async def _read_body(self) -> bytes:
        limit = self.gateway.settings.llama_proxy_max_body_bytes
        declared = _header(self.scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
        body = bytearray()
        while True:
            message = await self.receive()
            body += message.get("body", b"")
            if len(body) > limit:
                raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
            if not message.get("more_body"):
                return bytes(body)

    async def _admit(self, key_id: str) -> None:
        """Submit the admission: wait for it, unless it is expected to pass (then
        `_forward` settles it while the engine works)."""
        pending = self.gateway.admissions.submit(key_id)
        self._admission = pending.future
        if pending.expected is None:
            await self._admitted()
        else:
            self.row.user_id = pending.expected.user_id
            self.row.username = pending.expected.username

    async def _admitted(self) -> None:
        """Settle the admission (only ever in the request's own task, never in the relay's),
        raising its refusal; once admitted, the relay may answer."""
        if self._admission is not None:
            admission, self._admission = self._admission, None
            try:
                self._settle(await admission)
            except BaseException:
                self._refused = True
                raise
            finally:
                self._cleared.set()

    async def _gate(self) -> None:
        """Wait until the request is admitted. A refused request's relay ends here: it is
        being cancelled, and must never answer (nor wait for a clearance that will not
        come, if the cancel was lost on its way)."""
        await self._cleared.wait()
        if self._refused:
            raise asyncio.CancelledError

    def _settle(self, admission: Admission | None) -> None:
        if admission is None:  # the key was deleted with its user
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        self.row.user_id, self.row.username = admission.user_id, admission.username
        refuse_unless_usable(admission.state)
        self.headers += rate_limit_headers(admission)
        if not admission.allowed:
            retry = max(1, round(admission.retry_after + 0.5))
            raise RateLimited(
                f"Rate limit reached: {admission.limit} requests per {admission.window}s. "
                f"Retry in {retry}s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )

    def _prepare(self, raw: bytes) -> tuple[bytes, bool, bool]:
        """The body for the engine, whether it streams, and whether the client wants usage.
        It is checked as the engines check it (`check_request`), so that no route lets
        through what another refuses, and sent as it came unless a check changed it."""
        if self.row.path == "/v1/embeddings":  # refused by the engines, in their words
            self.row.model = _model(parse_object(raw))
            return raw, False, False
        body, changed = check_request(self.row.path, raw)
        self.row.model = body["model"]
        self.row.stream = stream = body.get("stream") is True
        options = body.get("stream_options") or {}
        wants_usage = options.get("include_usage") is True
        if stream and not wants_usage:
            # Ask for usage anyway, to account it exactly; that chunk is not passed on.
            body["stream_options"] = {**options, "include_usage": True}
            changed = True
        return (json.dumps(body).encode() if changed else raw), stream, wants_usage

    async def _forward(self, body: bytes, stream: bool, wants_usage: bool) -> None:
        """Relay the engine's answer. A client that goes away cancels the engine's work, and
        so do the refusal of a request that went ahead of its admission and the end of a
        stop's grace (`cut_off`)."""
        if self.gateway.grace_over:
            raise server_stopping()
        relay = self._relay = asyncio.ensure_future(self._relay_answer(body, stream, wants_usage))
        gone = asyncio.ensure_future(_disconnected(self.receive))
        self.gateway.exchanges.add(self)
        try:
            if self._admission is not None:
                watched: set[asyncio.Future[Any]] = {relay, gone, self._admission}
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if not (relay.done() or gone.done()):
                    await self._admitted()
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            if relay.cancelled():  # by `cut_off`
                raise server_stopping()
            if relay.done():
                relay.result()
                return
        finally:
            self.gateway.exchanges.discard(self)
            gone.cancel()
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
        self.row.outcome = "cancelled"
        if not self.started:
            self.row.status = 499  # nginx's "client closed request"

    def cut_off(self) -> None:
        """The gateway is stopping and its grace is over: stop relaying, which closes the
        request to the engine, and end the answer with an error (see `_forward`)."""
        if self._relay is not None:
            self._relay.cancel()

    async def _relay_answer(self, body: bytes, stream: bool, wants_usage: bool) -> None:
        """Send to an engine; if it could not take the request, and the client has had
        nothing yet, once more to another engine (a timeout is not retried: the engine
        had the request)."""
        tried: EngineState | None = None
        for last in (False, True):
            async with self._engine(exclude=tried) as engine:
                self.row.engine = engine.url
                try:
                    await self._exchange(engine.url, body, stream, wants_usage, last)
                    return
                except (ServiceUnavailable, UpstreamFailed) as error:
                    if isinstance(error, ServiceUnavailable) and not self.started:
                        self.row.engine = None  # not reachable, or it refused: it had nothing
                    if self.started or last:
                        raise
                    self.gateway.watch.take_out(engine, error.message)
                    if not self.gateway.scheduler.has_other(engine):
                        raise
                    tried = engine

    @contextlib.asynccontextmanager
    async def _engine(self, exclude: EngineState | None) -> AsyncIterator[EngineState]:
        """A slot of an engine for generation; any healthy engine for the rest."""
        scheduler = self.gateway.scheduler
        if self.row.method != "POST":
            yield scheduler.any_engine(exclude)
            return
        user = self.row.user_id
        assert user is not None  # admitted
        engine, lease = await self._slot(user, exclude)
        try:
            yield engine
        finally:
            scheduler.release(user, engine)
            self.gateway.leases.give_back(lease)

    async def _slot(self, user: int, exclude: EngineState | None) -> tuple[EngineState, uuid.UUID]:
        """A slot of an engine, and one of the user's leases under the cap across gateways
        (see `Leases`): a user at the cap through other gateways gives the slot back and
        waits, first in line, until one of their requests ends."""
        scheduler, leases = self.gateway.scheduler, self.gateway.leases
        deadline = time.monotonic() + scheduler.limits.max_wait
        again = False
        while True:
            began = time.monotonic()
            try:
                grant = await scheduler.acquire(
                    user, exclude, again=again, max_wait=deadline - began
                )
            except BaseException:  # timed out, gone, stopped: the wait is logged all the same
                self.row.queue_ms = (self.row.queue_ms or 0.0) + (time.monotonic() - began) * 1000
                raise
            self.row.queue_ms = (self.row.queue_ms or 0.0) + grant.waited * 1000
            heard = leases.heard(user)
            try:
                if grant.waited >= RECHECK_AFTER:
                    await self._still_usable()
                lease = await leases.take(user)
            except BaseException:
                scheduler.release(user, grant.engine)
                raise
            if lease is not None:
                return grant.engine, lease
            leases.hold(user, since=heard)  # before the slot goes back: not to this user again
            scheduler.release(user, grant.engine)
            again = True

    async def _still_usable(self) -> None:
        """A key revoked, expired or whose user was disabled while its request waited is
        refused when the request leaves the queue: a leaked key's backlog never runs."""
        assert self.row.key_id is not None  # authenticated
        with database_errors():
            state = await limits.key_state(self.gateway.pool, key_id=self.row.key_id)
        refuse_unless_usable(state)

    async def _exchange(
        self, url: str, body: bytes, stream: bool, wants_usage: bool, last: bool
    ) -> None:
        # The path as parsed, encoded again: what the client sent percent-encoded is never
        # decoded into the request line (a CR/LF there would write a second request).
        path = quote(self.row.path, safe="/")
        async with self.gateway.upstream.send(url, self.row.method, path, body) as reply:
            if reply.status in RETRYABLE and not last:
                raise ServiceUnavailable(f"The engine answered {reply.status}.")
            if reply.status >= 400:
                await self._relay_error(reply)
            elif stream and reply.content_type == "text/event-stream":
                await self._relay_stream(reply, wants_usage)
            else:
                await self._relay_body(reply)

    async def _relay_body(self, reply: Reply) -> None:
        raw = await reply.read()
        if reply.content_type == "application/json":
            with contextlib.suppress(ValueError, AttributeError):
                self._count_usage(json.loads(raw).get("usage"))
        content_type = reply.content_type.encode() or b"application/octet-stream"
        await self._whole(reply.status, content_type, raw)

    async def _relay_error(self, reply: Reply) -> None:
        raw = await reply.read()
        error = openai_error(reply.status, raw)
        if error is None:  # the engine's answer is an envelope already
            self.row.error = _error_message(raw)
            await self._whole(reply.status, b"application/json", raw)
        else:
            await self._gate()
            await self._fail(error, status=reply.status)

    async def _relay_stream(self, reply: Reply, wants_usage: bool) -> None:
        self.streaming = True
        await self._start(200, STREAM_HEADERS)
        events = EventSplitter()
        done = False
        async for chunk in reply.chunks():
            out = []
            for event in events.feed(chunk):
                data = event_data(event)
                done = done or data == DONE
                if data is not None and data != DONE and not self._keep(data, wants_usage):
                    continue
                out.append(event)
            if out:
                await self._body(b"".join(out))
        if not done:
            raise UpstreamFailed("The engine ended the stream before it was complete.")
        await self._body(b"", more=False)

    def _keep(self, data: bytes, wants_usage: bool) -> bool:
        """Read one streamed chunk for accounting; False drops the usage chunk we added."""
        chunk = parse_chunk(data)
        if chunk is None:
            return True
        if is_usage_only(chunk):
            self._count_usage(chunk["usage"])
            return wants_usage
        if self.row.ttft_ms is None and has_output(chunk):
            self.row.ttft_ms = self._elapsed_ms()
        if isinstance(chunk.get("error"), dict):
            self.row.outcome = "error"
            self.row.error = str(chunk["error"].get("message"))
        return True

    def _count_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.row.prompt_tokens = usage.get("prompt_tokens")
            self.row.completion_tokens = usage.get("completion_tokens")

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self._gate()
        self.row.status = status
        self.started = True
        await self._send(
            {"type": "http.response.start", "status": status, "headers": headers + self.headers}
        )

    async def _whole(self, status: int, content_type: bytes, body: bytes) -> None:
        """A whole answer, with its length (no chunked encoding)."""
        length = b"%d" % len(body)
        await self._start(status, [(b"content-type", content_type), (b"content-length", length)])
        await self._body(body, more=False)

    async def _body(self, data: bytes, more: bool = True) -> None:
        self.row.bytes_out += len(data)
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def _fail(self, error: APIError, status: int | None = None) -> None:
        if self._admission is not None:  # a refusal comes before what went wrong meanwhile
            try:
                await self._admitted()
            except APIError as refusal:
                error, status = refusal, None
        self.row.error = error.message
        if self.row.outcome != "cancelled":
            self.row.outcome = "error"
        if self.streaming and self.started:
            await self._body(sse_error_event(error), more=False)
        elif not self.started:
            self.row.status = status or error.status
            self.started = True
            wire = _CountingSend(self._send)
            await send_error(wire, error, status=self.row.status, headers=self.headers)
            self.row.bytes_out += wire.count

    def _finish(self) -> None:
        if self._admission is not None:  # never settled: the client went away first
            _discard(self._admission)
        row = self.row
        row.latency_ms = self._elapsed_ms()
        if row.outcome == "ok" and row.status >= 400:  # the engine's own error, passed on
            row.outcome = "error"
        if row.outcome == "error" and 400 <= row.status < 500:
            row.outcome = "rejected"
        self.gateway.requests.add(row)
        log.info(
            "request id=%s user=%s key=%s %s %s status=%d outcome=%s latency_ms=%.1f "
            "ttft_ms=%s tokens=%s+%s",
            row.request_id, row.username, row.key_id, row.method, row.path, row.status,
            row.outcome, row.latency_ms, _ms(row.ttft_ms), row.prompt_tokens,
            row.completion_tokens,
        )  # fmt: skip

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self.began) * 1000


class _CountingSend:
    """Counts the body bytes that pass through an ASGI send."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.count = 0

    async def __call__(self, message: Message) -> None:
        self.count += len(message.get("body", b""))
        await self._send(message)


def _discard(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()  # retrieved: asyncio would log it as never retrieved


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) else None


def _error_message(raw: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(raw)["error"]["message"])
    return None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
