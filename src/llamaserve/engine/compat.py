"""An ASGI middleware that mends where llama_cpp.server falls short of OpenAI's API.

- the route and the key are checked first, as the other engine's front checks them (an
  unknown path is 404 before the key is 401; llama_cpp's extra routes are not served);
- every error answers in OpenAI's envelope (FastAPI's `{"detail": ...}` and 422s are rewritten);
- `response_format` of type `json_schema` becomes the json_object-with-schema form the
  engine understands;
- `stream_options.include_usage` gets its last chunk carrying usage, counted by the engine;
- requests are checked as the other engine's front checks them (`protocol`: OpenAI's types
  and ranges; `n` > 1, several prompts, images and a `model` other than the served one are
  refused instead of silently ignored), then by llama_cpp's own models; `/v1/embeddings`
  is a 404 (the model is loaded for generation only);
- `GET /v1/models/{model}` (OpenAI's "retrieve model", which the server lacks) answers
  from its model list, whose models get the `created` the server leaves out;
- a whole chat answer gets the `refusal` OpenAI requires (`answers.with_refusal`), and
  streamed calls OpenAI's deltas (`call_deltas`);
- a completion of `max_tokens` 0 with `echo` is answered here (`readback`), never generated;
- `GET /health` (no key) answers `{"status": "ok", "slots": 1}`: it runs one request at a time;
- an exception once a stream has started ends it with an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.engine import tally
from llamaserve.engine.call_deltas import CallDeltas
from llamaserve.engine.fields import model_list, with_refusal
from llamaserve.engine.protocol import (
    CHECKS,
    check_key,
    check_route_and_key,
    json_schema_of,
    no_embeddings,
    parse_request,
    prompts,
    retrieve_model,
    validate,
)
from llamaserve.engine.readback import ReadBack
from llamaserve.engine.tally import Tallies, Tally
from llamaserve.errors import APIError, InternalError, openai_error
from llamaserve.http import asgi, sse
from llamaserve.http.answer import Answer, send_error, send_json
from llamaserve.routes import check_method, model_of

Usage = Tally  # the tokens of one request, filled in by the engine's generation hook


# Set per request by the middleware; the generation hook adds to it from the worker thread.
current_usage: contextvars.ContextVar[Usage | None] = contextvars.ContextVar(
    "current_usage", default=None
)


@dataclass(frozen=True)
class Rewritten:
    body: bytes  # for the engine
    include_usage: bool  # the client asked for usage in the stream
    echo: str | None  # a streamed completion's prompt, to put before its text
    read_back: ReadBack | None  # answered by the front: nothing to generate


def rewrite_request(
    raw: bytes,
    model_id: str,
    path: str,
    schema: type[BaseModel] | None = None,
    *,
    fold_system: bool = False,
) -> Rewritten:
    """The request for the engine: checked as the other engine's front checks it, then
    by the engine's own `schema`. `fold_system`: the chat format has no system turn."""
    body = parse_request(raw, model_id)
    CHECKS[path](body)
    read_back = ReadBack.of(body)
    body["response_format"] = _engine_response_format(body.get("response_format"))
    # OpenAI applies no repetition penalty unless asked, nor does llama-server; llama_cpp's
    # default is 1.1, which would make the same request answer otherwise on this engine.
    body.setdefault("repeat_penalty", 1.0)
    if isinstance(body.get("messages"), list):
        body["messages"] = _engine_messages(body["messages"], fold_system)
    stream_options = body.pop("stream_options", None) or {}
    if schema is not None:
        validate(schema, body)
    stream = bool(body.get("stream"))
    include_usage = stream and bool(stream_options.get("include_usage"))
    echo = None  # the engine echoes the prompt of a whole answer, not of a stream
    if stream and body.get("echo") is True and path == "/v1/completions":
        [prompt] = prompts(body["prompt"])  # one: see check_completion
        echo = prompt if isinstance(prompt, str) else None
    return Rewritten(json.dumps(body).encode(), include_usage, echo, read_back)


def _engine_messages(messages: list[Any], fold_system: bool) -> list[Any]:
    """`developer` messages as `system` ones (OpenAI's newer name, which llama_cpp does
    not know); an assistant's calls with no content get an empty one (llama_cpp's schema
    wants a string, where OpenAI allows null). With `fold_system` (the gemma format,
    whose template has no system turn and drops such messages), system messages go
    before the next user message's text, as llama.cpp's own gemma template puts them; and
    a tool's result is a user turn, as that format drops the turns of other roles (the
    result would be lost; llama-server's template writes it as a turn of its own)."""
    found: list[Any] = []
    system = ""
    for message in messages:
        if message.get("role") == "developer":
            message = {**message, "role": "system"}
        if message.get("role") == "assistant" and message.get("content") is None:
            message = {**message, "content": ""}
        if fold_system and message.get("role") == "tool":
            message = {"role": "user", "content": message.get("content") or ""}
        if fold_system and message.get("role") == "system":
            system += _text(message.get("content")).strip()
            continue
        if system and message.get("role") == "user":
            message = {**message, "content": _prefixed(system + "\n\n", message.get("content"))}
            system = ""
        found.append(message)
    return found


def _with_bearer(scope: Scope, key: bytes) -> Scope:
    """The request with the key (checked) as llama_cpp checks it again: a bearer token,
    whichever header the client sent it in (`x-api-key`, as Anthropic's clients do)."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"authorization", b"x-api-key")]
    return {**scope, "headers": [*headers, (b"authorization", b"Bearer " + key)]}


def _text(content: Any) -> str:
    if isinstance(content, list):  # text parts (others are refused by check_chat)
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _prefixed(prefix: str, content: Any) -> Any:
    if isinstance(content, list):
        return [{"type": "text", "text": prefix}, *content]
    return prefix + (content if isinstance(content, str) else "")


def _engine_response_format(fmt: Any) -> Any:
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_object", "schema": json_schema_of(fmt)}
    return fmt


async def _stopped_when_gone(answer: Awaitable[None], receive: Receive, usage: Usage) -> None:
    """Run `answer`, and stop its generation if the client goes away meanwhile (`receive`:
    the client's own messages, its body read already). llama_cpp generates a whole answer
    in a worker thread, which cancelling the request does not stop: it ended a request of
    2,000 tokens 80 s after its client had gone, busy for no one all that time."""

    def gone(watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled() and watcher.exception() is None:
            usage.stopped = True

    watcher = asyncio.ensure_future(asgi.disconnected(receive))
    watcher.add_done_callback(gone)
    try:
        await answer
    finally:
        watcher.cancel()


class CompatMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: SecretStr,
        model_id: str,
        created: int,
        prompt_tokens: Callable[[str], int],
        schemas: dict[str, type[BaseModel]] | None = None,
        fold_system: bool = False,
    ) -> None:
        self.app = app
        self.prompt_tokens = prompt_tokens  # a completion prompt's, as the engine counts
        self.key = api_key.get_secret_value().encode()
        self.model_id = model_id
        self.created = created  # of the model, in its listing
        self.schemas = schemas or {}
        self.fold_system = fold_system
        self.tallies = Tallies()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope["path"] == "/health":
                check_method("/health", scope["method"], "GET")
                await send_json(send, {"status": "ok", "slots": 1})
                return
            if scope["path"].startswith(tally.PREFIX):
                check_method(scope["path"], scope["method"], "GET")
                check_key(scope, self.key)
                await self.tallies.answer(scope["path"], send)
                return
            check_route_and_key(scope, self.key)
        except APIError as error:
            await send_error(send, error)
            return
        scope = _with_bearer(scope, self.key)
        model = model_of(scope["path"])
        if scope["path"] == "/v1/models" or model is not None:
            await self._models(scope, receive, send, model)
            return
        if scope["path"] == "/v1/embeddings":
            await send_error(send, no_embeddings(self.model_id))
            return
        include_usage, echo = False, None
        client: Receive | None = None  # the client's own messages, once its body is read
        if scope["method"] == "POST" and scope["path"] in CHECKS:
            try:
                raw = await asgi.read_body(receive)
                schema = self.schemas.get(scope["path"])
                rewritten = rewrite_request(
                    raw, self.model_id, scope["path"], schema, fold_system=self.fold_system
                )
            except APIError as error:
                await send_error(send, error)
                return
            if (read_back := rewritten.read_back) is not None:
                assert isinstance(read_back.prompt, str)  # llama_cpp refuses token ids
                count = await asyncio.to_thread(self.prompt_tokens, read_back.prompt)
                await read_back.answer(send, read_back.prompt, count)
                return
            include_usage, echo = rewritten.include_usage, rewritten.echo
            client = receive
            scope, receive = asgi.with_body(scope, rewritten.body, receive)
        usage = self.tallies.open(scope)  # the gateway may ask for it (`tally`)
        token = current_usage.set(usage)
        chat = scope["path"] == "/v1/chat/completions"
        mender = ResponseMender(send, usage if include_usage else None, echo, chat=chat)
        try:
            answer = self.app(scope, receive, mender.send)
            await (answer if client is None else _stopped_when_gone(answer, client, usage))
        except Exception as exc:
            await mender.fail(InternalError(f"The engine failed: {exc}"))
        finally:
            usage.ended = True
            current_usage.reset(token)

    async def _models(self, scope: Scope, receive: Receive, send: Send, model: str | None) -> None:
        """The server's own model list (which checks the key) as OpenAI's, or its entry
        for `model`."""
        listing = _Captured()
        path = {"path": "/v1/models", "raw_path": b"/v1/models"}
        await self.app({**scope, **path}, receive, listing.send)
        if listing.status != 200:
            mender = ResponseMender(send, None)  # the server's error, in OpenAI's envelope
            for message in listing.messages:
                await mender.send(message)
            return
        models = model_list(json.loads(listing.body), self.created)
        try:
            answer = models if model is None else retrieve_model(models, model, self.model_id)
        except APIError as error:
            await send_error(send, error)
            return
        await send_json(send, answer)


class _Captured:
    """The messages of an answer the app sent, kept instead of sent."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"]) if self.messages else 500

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


class ResponseMender:
    """Wraps `send`: envelopes error bodies, mends a whole chat answer (`chat`), adds the
    usage chunk, ends failed streams cleanly (`fail`). A stream is read event by event,
    however the engine cut its writes."""

    def __init__(
        self, send: Send, usage: Usage | None, echo: str | None = None, *, chat: bool = False
    ) -> None:
        self.answer = Answer(send)
        self._usage = usage
        self._echo = echo
        self._chat = chat
        self._start: Message | None = None  # of an answer held until its body is whole
        self._held = b""
        self._last_chunk: dict[str, Any] = {}
        self._calls = CallDeltas()
        self._events = sse.EventSplitter()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._on_start(message)
        elif message["type"] == "http.response.body" and self._start is not None:
            await self._on_held_body(message)
        elif message["type"] == "http.response.body" and self.answer.streaming:
            await self._on_stream_body(message)
        else:
            await self.answer.send(message)

    async def fail(self, error: APIError) -> None:
        await self.answer.fail(error)

    async def _on_start(self, message: Message) -> None:
        headers = dict(message.get("headers", []))
        content_type = headers.get(b"content-type", b"")
        if content_type.startswith(b"application/json") and (
            message["status"] >= 400 or self._chat
        ):
            self._start = message  # an error to envelope, or a chat answer to mend
            return
        await self.answer.send(message)

    async def _on_held_body(self, message: Message) -> None:
        self._held += message.get("body", b"")
        if message.get("more_body"):
            return
        assert self._start is not None
        start, body = self._start, self._held
        self._start = None
        if start["status"] < 400:  # a chat answer
            start, body = _with_refusals(start, body)
        elif (error := openai_error(start["status"], body)) is not None:
            await self.answer.fail(error, status=start["status"])
            return
        await self.answer.send(start)
        await self.answer.send({"type": "http.response.body", "body": body})

    async def _on_stream_body(self, message: Message) -> None:
        out = [self._mended(raw) for raw in self._events.feed(message.get("body", b""))]
        if not message.get("more_body", False):
            out.append(self._events.pending)  # an event left unended goes as it came
        await self.answer.send({**message, "body": b"".join(out)})

    def _mended(self, raw: bytes) -> bytes:
        """One event of the stream, mended."""
        calls = b'"tool_calls"' in raw or b'"function_call"' in raw
        if self._echo is None and not calls and self._usage is None:
            return raw
        event = sse.Event.parse(raw)
        if event.done and self._usage is not None:
            return self._usage_event() + raw
        chunk = event.json()
        if chunk is None:
            return raw
        if self._usage is not None:
            self._last_chunk = chunk
        if self._echo is None and not calls:
            return raw
        if self._echo is not None:  # the first chunk: its text after the prompt's
            for choice in chunk.get("choices") or []:
                choice["text"] = f"{self._echo}{choice.get('text') or ''}"
            self._echo = None
        if calls:
            self._calls.mend(chunk)
        return sse.event(chunk)

    def _usage_event(self) -> bytes:
        assert self._usage is not None
        last = self._last_chunk
        return sse.event(
            {
                "id": last.get("id"),
                "object": last.get("object", "chat.completion.chunk"),
                "created": last.get("created"),
                "model": last.get("model"),
                "choices": [],
                "usage": self._usage.as_dict(),
            }
        )


def _with_refusals(start: Message, raw: bytes) -> tuple[Message, bytes]:
    """A whole chat answer with the `refusal` OpenAI requires (llama_cpp leaves it out of
    the message), and the start of the answer with its new length."""
    try:
        answer = json.loads(raw)
        choices = answer["choices"]
    except (ValueError, KeyError, TypeError):
        return start, raw  # not a chat answer: passed on as it is
    for choice in choices:
        with_refusal(choice)
    body = json.dumps(answer).encode()
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
    return {**start, "headers": [*headers, (b"content-length", b"%d" % len(body))]}, body
