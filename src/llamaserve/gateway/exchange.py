"""The life of one proxied request, in steps: route, key, body, admission (rate limit),
a fair slot of an engine (`Slots`), the relay of its answer, and the request's row in
`llama_requests`.

A request whose admission the gateway expects to pass (see `Admissions`) goes to the
engine while the database decides; the answer's first byte waits for the decision,
and a refusal cancels the engine's work at once. So does a reservation of a metered
user's tokens smaller than the completion's bound it went with (another gateway took
from the quota meanwhile): the request is then sent again with the bound reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from starlette.types import Receive, Scope, Send

from llamaserve.bodies import parse_object
from llamaserve.engine import tally
from llamaserve.engine.bridge import GENERATION_CHECKS
from llamaserve.engine.protocol import CHECKS as CHAT_CHECKS
from llamaserve.engine.protocol import normalise
from llamaserve.errors import (
    APIError,
    AuthenticationFailed,
    InternalError,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
    UpstreamFailed,
    openai_error,
    server_stopping,
    speaks_anthropic,
)
from llamaserve.gateway.admission import (
    Admissions,
    Admitted,
    Ask,
    rate_limit_headers,
    refuse_unless_usable,
)
from llamaserve.gateway.affinity import Prefixes
from llamaserve.gateway.auth import Authenticator
from llamaserve.gateway.fairness import expected_tokens
from llamaserve.gateway.logbook import RequestLog
from llamaserve.gateway.metering import Meter
from llamaserve.gateway.metrics import Metrics
from llamaserve.gateway.quotas import (
    COMPLETION_BOUNDS,
    Quotas,
    ask_of,
    bound,
    refusal,
    token_headers,
)
from llamaserve.gateway.scheduling import EngineState
from llamaserve.gateway.slots import Slots
from llamaserve.gateway.stored import StoredResponses
from llamaserve.http import asgi, sse
from llamaserve.http.answer import STREAM_HEADERS, Answer, Headers
from llamaserve.http.stopping import InFlight
from llamaserve.http.upstream import Reply, Upstream
from llamaserve.routes import RESPONSES, check_route, response_of
from llamaserve.store.quotas import Reservation
from llamaserve.store.requests import RequestRow

log = logging.getLogger("llamaserve.gateway")

RETRYABLE = frozenset({502, 503, 504})  # the engine could not take the request
# How long the gateway waits for an engine to have stopped a request cut off, to read
# what it generated: the engine stops at its next token.
TALLY_POLLS = 100
TALLY_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Services:
    """What an exchange uses of its gateway."""

    max_body: int  # bytes
    auth: Authenticator
    admissions: Admissions
    slots: Slots
    upstream: Upstream
    in_flight: InFlight
    requests: RequestLog
    stored: StoredResponses
    quotas: Quotas
    metrics: Metrics


class Exchange:
    """One proxied request."""

    def __init__(self, services: Services, scope: Scope, receive: Receive, send: Send) -> None:
        self.services = services
        self.scope = scope
        self.receive = receive
        self.began = time.perf_counter()
        client = scope.get("client")
        self.row = RequestRow(
            request_id=uuid.uuid4().hex,
            created_at=datetime.now(UTC),
            method=scope["method"],
            path=scope["path"],
            client_addr=client[0] if client else None,
        )
        request_id = [(b"x-request-id", self.row.request_id.encode())]
        self.answer = Answer(send, request_id, anthropic=speaks_anthropic(scope["path"]))
        self.meter = Meter(self.row, self.began)
        # A Responses request's whole input, kept with its response when it is stored.
        self.conversation: list[dict[str, Any]] | None = None
        self.previous_id: str | None = None
        self.metered = False  # the user's tokens are metered: a quota or a token rate limit
        self.reservation: Reservation | None = None  # of the tokens it may use
        self.prefixes: Prefixes | None = None  # its conversation's, to route it by prefix
        # A generating request's body, read before its admission (`_read`), or the error
        # it is refused with once admitted.
        self._body: dict[str, Any] | APIError | None = None
        self._normalised = False  # `normalise` changed it
        self._ahead: dict[str, Any] | None = None  # the body sent ahead of its admission
        self._admission: asyncio.Future[Admitted | None] | None = None  # until settled
        self._cleared = asyncio.Event()  # the admission is settled: `_refused` says how
        self._refused = False
        self._failure: APIError | None = None  # the error the request ended with

    async def run(self) -> None:
        try:
            try:
                await self._serve()
            except APIError as error:
                await self._fail(error)
            except Exception as exc:
                log.exception("request %s failed", self.row.request_id)
                await self._fail(InternalError(f"Internal error ({type(exc).__name__})."))
            await self._count_what_was_cut()
        finally:
            self._finish()

    async def _count_what_was_cut(self) -> None:
        """The tokens of a request that reached an engine but ended without its usage (its
        client went away, an error, a stop): the engine's own count, read from it
        (`engine/tally.py`), once it has stopped. Left unknown if the engine cannot say."""
        row = self.row
        if row.engine is None or row.method != "POST" or row.completion_tokens is not None:
            return
        failed = row.outcome == "error" and (row.status >= 500 or self.answer.streaming)
        if row.outcome != "cancelled" and not failed:
            return  # answered whole without usage, or refused by the engine: nothing to read
        path = tally.PREFIX + row.request_id
        try:
            for _ in range(TALLY_POLLS):
                async with self.services.upstream.send(row.engine, "GET", path) as reply:
                    answer = await reply.read()
                if reply.status != 200:
                    return
                counted = json.loads(answer)
                if counted.get("ended"):
                    break
                await asyncio.sleep(TALLY_POLL_SECONDS)
        except (APIError, OSError, ValueError) as exc:
            log.warning("request %s: its tokens could not be read from the engine: %s",
                        row.request_id, exc)  # fmt: skip
            return
        row.prompt_tokens = counted.get("prompt_tokens")
        row.completion_tokens = counted.get("completion_tokens")

    async def _serve(self) -> None:
        check_route(self.row.path, self.row.method)  # never an engine's /slots, /props...
        # The key before the body: a client without a valid one never has its body read
        # (up to LLAMA_PROXY_MAX_BODY_BYTES). The admission after it: submitted before,
        # the benchmark's overhead at 32 clients grew by a few tenths of a millisecond.
        authorization = asgi.header(self.scope, b"authorization")
        x_api_key = asgi.header(self.scope, b"x-api-key")  # as Anthropic's clients send it
        self.row.key_id = await self.services.auth.authenticate(authorization, x_api_key)
        try:
            body = await asgi.read_body(self.receive, self.scope, self.services.max_body)
        except RequestTooLarge:  # the user's request all the same: counted, logged as theirs
            await self._admit(self.row.key_id, None)
            raise
        self.row.bytes_in = len(body)
        await self._admit(self.row.key_id, self._read(body))
        if (response_id := response_of(self.row.path)) is not None:
            await self._stored(response_id)
            return
        stream, wants_usage = False, False
        if self.row.method == "POST":
            body, stream, wants_usage = await self._prepare(body)
        await self._forward(body, stream, wants_usage)

    async def _stored(self, response_id: str) -> None:
        """GET or DELETE a stored response of the caller's (`StoredResponses`)."""
        await self._admitted()
        assert self.row.user_id is not None
        stored = self.services.stored
        if self.row.method == "GET":
            answer = await stored.get(self.row.user_id, response_id)
        else:
            answer = await stored.delete(self.row.user_id, response_id)
        await self._whole(200, b"application/json", json.dumps(answer).encode())

    def _read(self, raw: bytes) -> Ask | None:
        """A generating request's body, parsed and normalised before its admission, and
        what it asks of its user's token quota (nothing for any other request)."""
        if self.row.method != "POST" or self.row.path not in COMPLETION_BOUNDS:
            return None
        try:
            body = parse_object(raw)
            self.row.model = _model(body)
            self._normalised = normalise(body)
        except APIError as error:  # a refusal of its admission comes first
            self._body = error
            return None
        self._body = body
        return ask_of(self.row.path, body)

    async def _admit(self, key_id: str, ask: Ask | None) -> None:
        """Submit the admission: wait for it, unless it is expected to pass (then
        `_forward` settles it while the engine works)."""
        pending = self.services.admissions.submit(key_id, ask)
        self._admission = pending.future
        if pending.expected is None:
            await self._admitted()
        else:
            self.row.user_id = pending.expected.user_id
            self.row.username = pending.expected.username
            self.metered = pending.expected.metered

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
        come, if the cancel was lost on its way). One sent ahead with a larger completion
        bound than its reservation is sent again (`_Rebound`)."""
        await self._cleared.wait()
        if self._refused:
            raise asyncio.CancelledError
        ahead, self._ahead = self._ahead, None
        reserved = self.reservation
        if ahead is not None and reserved is not None and bound(self.row.path, ahead, reserved):
            raise _Rebound(json.dumps(ahead).encode())

    def _settle(self, admitted: Admitted | None) -> None:
        if admitted is None:  # the key was deleted with its user
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        admission = admitted.admission
        self.row.user_id, self.row.username = admission.user_id, admission.username
        self.metered = admission.metered
        refuse_unless_usable(admission.state)
        self.answer.headers += rate_limit_headers(admission)
        if not admission.allowed:
            retry = max(1, round(admission.retry_after + 0.5))
            raise RateLimited(
                f"Rate limit reached: {admission.limit} requests per {admission.window}s. "
                f"Retry in {retry}s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        if (reservation := admitted.reservation) is not None:
            self.answer.headers += token_headers(reservation)
            if not reservation.allowed:
                raise refusal(reservation)
            self.reservation = reservation

    async def _prepare(self, raw: bytes) -> tuple[bytes, bool, bool]:
        """The body for the engine, whether it streams, and whether the client wants usage.
        It is checked as the engines check it (`GENERATION_CHECKS`), so that no route lets
        through what another refuses, and sent as it came unless a check changed it. A
        Responses request continuing a stored response gets the whole conversation."""
        path = self.row.path
        if path == "/v1/embeddings":  # refused by the engines, in their words
            self.row.model = _model(parse_object(raw))
            return raw, False, False
        if isinstance(self._body, APIError):
            raise self._body
        body = self._body if self._body is not None else parse_object(raw)
        self.row.model = _model(body)
        changed = self._normalised
        if path == RESPONSES:
            await self._continue(body)
            changed = True
        changed = normalise(body) or changed
        GENERATION_CHECKS[path](body)
        self.prefixes = self.services.slots.prefixes(path, body)
        if self._admission is not None:  # sent ahead: its bound checked at `_gate`
            self._ahead = body
        elif self.reservation is not None:
            changed = bound(path, body, self.reservation) or changed
        self.row.model = body["model"]
        self.row.stream = stream = body.get("stream") is True
        if path not in CHAT_CHECKS:  # the other APIs' streams carry their usage
            return (json.dumps(body).encode() if changed else raw), stream, False
        options = body.get("stream_options") or {}
        wants_usage = options.get("include_usage") is True
        if stream and not wants_usage:
            # Ask for usage anyway, to account it exactly; that chunk is not passed on.
            body["stream_options"] = {**options, "include_usage": True}
            changed = True
        return (json.dumps(body).encode() if changed else raw), stream, wants_usage

    async def _continue(self, body: dict[str, Any]) -> None:
        """A Responses request's whole input (`StoredResponses.conversation`), kept with
        its response if that is to be stored (the engine stores nothing). The user's
        admission is settled first: their stored responses are read as theirs."""
        await self._admitted()
        assert self.row.user_id is not None
        stored = self.services.stored
        keep = stored.keeps(body)
        previous = body.get("previous_response_id")
        self.previous_id = previous if isinstance(previous, str) else None
        body.pop("store", None)
        items = await stored.conversation(self.row.user_id, body)
        self.conversation = items if keep else None

    async def _kept(self, response: dict[str, Any]) -> dict[str, Any]:
        """A Responses answer as the gateway gives it: continuing its previous response,
        and stored when it is whole (`store` says whether it was)."""
        response["previous_response_id"] = self.previous_id
        response["store"] = self.conversation is not None
        finished = response.get("status") in ("completed", "incomplete")
        if finished and self.conversation is not None and self.row.user_id is not None:
            response["store"] = await self.services.stored.save(
                self.row.user_id, self.conversation, response
            )
        return response

    async def _forward(self, body: bytes, stream: bool, wants_usage: bool) -> None:
        """Relay the engine's answer. A client that goes away cancels the engine's work, and
        so do the refusal of a request that went ahead of its admission and the end of a
        stop's grace (`InFlight`)."""
        in_flight = self.services.in_flight
        if in_flight.over:
            raise server_stopping()
        relay = asyncio.ensure_future(self._relay_answer(body, stream, wants_usage))
        gone = asyncio.ensure_future(asgi.disconnected(self.receive))
        with in_flight.track(relay) as ticket:
            try:
                if self._admission is not None:
                    watched: set[asyncio.Future[Any]] = {relay, gone, self._admission}
                    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                    if not (relay.done() or gone.done()):
                        await self._admitted()
                await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
                if relay.cancelled() and ticket.cut:  # the stop's grace is over
                    raise server_stopping()
                if relay.done():
                    relay.result()
                    return
            finally:
                gone.cancel()
                if not relay.done():
                    relay.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await relay
        self.row.outcome = "cancelled"
        if not self.answer.started:
            self.row.status = 499  # nginx's "client closed request"

    async def _relay_answer(self, body: bytes, stream: bool, wants_usage: bool) -> None:
        """Send to an engine; if it could not take the request, and the client has had
        nothing yet, once more to another engine (a timeout is not retried: the engine
        had the request)."""
        slots = self.services.slots
        tried: EngineState | None = None
        parsed = self._body if isinstance(self._body, dict) else None
        cost = expected_tokens(self.row.path, parsed, len(body))  # until its tokens are known
        for last in (False, True):
            async with slots.engine(self.row, tried, self.prefixes, cost=cost) as engine:
                self.row.engine = engine.url
                try:
                    await self._exchange(engine.url, body, stream, wants_usage, last)
                    return
                except (ServiceUnavailable, UpstreamFailed) as error:
                    started = self.answer.started
                    if isinstance(error, ServiceUnavailable) and not started:
                        self.row.engine = None  # not reachable, or it refused: it had nothing
                    if started or last:
                        raise
                    slots.take_out(engine, error.message)
                    if not slots.has_other(engine):
                        raise
                    tried = engine

    async def _exchange(
        self, url: str, body: bytes, stream: bool, wants_usage: bool, last: bool
    ) -> None:
        try:
            await self._send(url, body, stream, wants_usage, last)
        except _Rebound as again:  # what it went ahead with was more than it may take
            await self._send(url, again.body, stream, wants_usage, last)

    async def _send(
        self, url: str, body: bytes, stream: bool, wants_usage: bool, last: bool
    ) -> None:
        # The path as parsed, encoded again: what the client sent percent-encoded is never
        # decoded into the request line (a CR/LF there would write a second request).
        path = quote(self.row.path, safe="/")
        name = self.row.request_id if self.row.method == "POST" else None
        async with self.services.upstream.send(
            url, self.row.method, path, body, tally=name
        ) as reply:
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
        answer = self.meter.whole(reply.content_type, raw)
        if self.row.path == RESPONSES and answer is not None:
            await self._gate()  # stored only once admitted
            raw = json.dumps(await self._kept(answer)).encode()
        await self._whole(reply.status, reply.content_type.encode(), raw)

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
        """The engine's events as they come, each read (`Meter`); the usage chunk the
        gateway asked for is not passed on."""
        await self._start(200, STREAM_HEADERS)
        events = sse.EventSplitter()
        responses = self.row.path == RESPONSES
        async for chunk in reply.chunks():
            out = []
            for raw in events.feed(chunk):
                event = sse.Event.parse(raw)
                data = event.json()
                if not self.meter.event(event, data, wants_usage):
                    continue
                if responses and data is not None and isinstance(data.get("response"), dict):
                    data["response"] = await self._kept(data["response"])
                    raw = sse.event(data, str(data.get("type")))
                out.append(raw)
            if out:
                await self.answer.body(b"".join(out))
        if not self.meter.ended:
            raise UpstreamFailed("The engine ended the stream before it was complete.")
        await self.answer.body(b"", more=False)

    async def _start(self, status: int, headers: Headers) -> None:
        """The answer's start, once the request is admitted."""
        await self._gate()
        self.row.status = status
        await self.answer.start(status, headers)

    async def _whole(self, status: int, content_type: bytes, body: bytes) -> None:
        """A whole answer, with its length (no chunked encoding)."""
        length = b"%d" % len(body)
        content_type = content_type or b"application/octet-stream"
        await self._start(status, [(b"content-type", content_type), (b"content-length", length)])
        await self.answer.body(body, more=False)

    async def _fail(self, error: APIError, status: int | None = None) -> None:
        if self._admission is not None:  # a refusal comes before what went wrong meanwhile
            try:
                await self._admitted()
            except APIError as refusal:
                error, status = refusal, None
        self.row.error = error.message
        self._failure = error
        if self.row.outcome != "cancelled":
            self.row.outcome = "error"
        if not self.answer.started:
            self.row.status = status or error.status
        await self.answer.fail(error, status=self.row.status)

    def _finish(self) -> None:
        if self._admission is not None:  # never settled: the client went away first
            _discard(self._admission)
        row = self.row
        if row.engine is not None:  # its tokens charged to its user in the fair queue
            self.services.slots.settle(row)
        if self.reservation is not None or (self.metered and row.path in COMPLETION_BOUNDS
                                            and row.engine is not None):  # fmt: skip
            self.services.quotas.settle(self.reservation, row)
        row.latency_ms = self.meter.elapsed_ms()
        row.bytes_out = self.answer.bytes_out
        if row.outcome == "ok" and row.status >= 400:  # the engine's own error, passed on
            row.outcome = "error"
        if row.outcome == "error" and 400 <= row.status < 500:
            row.outcome = "rejected"
        self.services.requests.add(row)
        self.services.metrics.count(row, self._failure)
        log.info(
            "request id=%s user=%s key=%s %s %s status=%d outcome=%s latency_ms=%.1f "
            "ttft_ms=%s tokens=%s+%s",
            row.request_id, row.username, row.key_id, row.method, row.path, row.status,
            row.outcome, row.latency_ms, _ms(row.ttft_ms), row.prompt_tokens,
            row.completion_tokens,
        )  # fmt: skip


class _Rebound(Exception):
    """A request sent ahead of its admission must go again, with this body: its
    completion's bound lowered to the reservation (the client has had nothing)."""

    def __init__(self, body: bytes) -> None:
        super().__init__("sent again with the completion's bound reserved")
        self.body = body


def _discard(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()  # retrieved: asyncio would log it as never retrieved


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) else None


def _error_message(raw: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(raw)["error"]["message"])
    return None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
