"""OpenAI's Responses API and Anthropic's Messages API on both engines, over their chat
completions: an ASGI middleware in front of each engine's front.

A request to `/v1/responses`, `/v1/messages` or `/v1/messages/count_tokens` is checked,
turned into a chat request (`responses_api`, `messages_api`), and run by the front
inside as any chat request is run: with its mending (forced tool calls, JSON formats,
usage counted by the engine), its checks, and its cancellation when the client goes
away. Its chat stream is written back in the API's own shape, event by event, or whole.

Both engines go through here, so both answer these APIs alike. llama-server has its
own `/v1/responses` and `/v1/messages`, but they are not used: its Responses stream
lacks the output and content indices and the response snapshots that the OpenAI SDK's
stream reader needs, its conversion ignores `text.format`, and with the named chat
templates Llamaserve runs by default (`--no-jinja`) both refuse every tool; mending
them would mean writing each of their events again, which the chat stream does once.

The engine alone keeps no responses: `GET`/`DELETE /v1/responses/{id}` answer 404 and
`previous_response_id` 400, each naming the gateway, which keeps them.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Protocol

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.engine import messages_api, protocol, responses_api
from llamaserve.engine.protocol import check_route_and_key, parse_request
from llamaserve.errors import (
    APIError,
    InternalError,
    NotFound,
    UpstreamFailed,
    engine_error,
    speaks_anthropic,
)
from llamaserve.http import asgi, sse
from llamaserve.http.answer import STREAM_HEADERS, Answer
from llamaserve.routes import COUNT_TOKENS, MESSAGES, RESPONSE_PREFIX, RESPONSES, response_of

CHAT = "/v1/chat/completions"
CHECKS = {
    RESPONSES: responses_api.check_responses,
    MESSAGES: messages_api.check_messages,
    COUNT_TOKENS: messages_api.check_count_tokens,
}
Event = tuple[str, dict[str, Any]]


class Writer(Protocol):
    """An API's answer, written from a chat stream (`ResponseWriter`, `MessageWriter`)."""

    def start(self) -> list[Event]: ...
    def chunk(self, chunk: dict[str, Any]) -> list[Event]: ...
    def finish(self) -> list[Event]: ...
    def whole(self) -> dict[str, Any]: ...


def bridged(path: str) -> bool:
    """Whether a path is one of the APIs served over chat completions here."""
    return path in CHECKS or path.startswith(RESPONSE_PREFIX)


class ApiBridge:
    def __init__(self, app: ASGIApp, *, api_key: SecretStr, model_id: str) -> None:
        self.app = app
        self.key = api_key.get_secret_value().encode()
        self.model_id = model_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not bridged(scope["path"]):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        answer = Answer(send, anthropic=speaks_anthropic(path))
        try:
            check_route_and_key(scope, self.key)
            if response_of(path) is not None:
                raise NotFound(
                    f"No stored response here: the engine keeps none. Responses are stored "
                    f"by {responses_api.GATEWAY}.",
                    code="not_found",
                )
            body = parse_request(await asgi.read_body(receive), self.model_id)
            CHECKS[path](body)
        except APIError as error:
            await answer.fail(error)
            return
        if path == RESPONSES:
            chat = responses_api.to_chat(body)
            writer: Writer = responses_api.ResponseWriter(body)
        else:
            chat = messages_api.to_chat(body)
            writer = messages_api.MessageWriter(body)
        if path == COUNT_TOKENS:  # the prompt is read, one token generated and dropped
            chat["max_tokens"] = 1
        run = _Run(answer, writer, stream=body.get("stream") is True)
        scope = {**scope, "path": CHAT, "raw_path": CHAT.encode(), "query_string": b""}
        inner_scope, inner_receive = asgi.with_body(scope, json.dumps(chat).encode(), receive)
        try:
            await self.app(inner_scope, inner_receive, run.send)
            if run.error is not None:
                raise run.error
            if not run.ended:
                raise UpstreamFailed("The engine ended its answer before it was complete.")
        except APIError as error:
            await answer.fail(error)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            await answer.fail(InternalError(f"The engine failed: {type(exc).__name__}."))
        else:
            if path == COUNT_TOKENS:
                await answer.json({"input_tokens": writer.whole()["usage"]["input_tokens"]})
            elif not run.stream:
                await answer.json(writer.whole())


class _Run:
    """The ASGI `send` of the chat request inside: its stream, read event by event and
    written out in the API's shape (or kept for the whole answer). An error is kept, not
    raised into the app inside, which ends its own answer after it."""

    def __init__(self, answer: Answer, writer: Writer, *, stream: bool) -> None:
        self.answer = answer
        self.writer = writer
        self.stream = stream
        self.ended = False  # the chat stream's [DONE] came
        self.error: APIError | None = None
        self._status = 0
        self._error_body = b""
        self._events = sse.EventSplitter()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
            if self._status == 200 and self.stream:
                await self.answer.start(200, STREAM_HEADERS)
                await self._out(self.writer.start())
            return
        if message["type"] != "http.response.body":
            return
        data = message.get("body", b"")
        if self.error is not None or self.ended:
            return
        if self._status != 200:
            self._error_body += data
            if not message.get("more_body", False):
                self.error = engine_error(self._status, self._error_body)
            return
        for raw in self._events.feed(data):
            event = sse.Event.parse(raw)
            if event.done:
                self.ended = True
                await self._out(self.writer.finish())
                if self.stream:
                    await self.answer.body(b"", more=False)
                return
            chunk = event.json()
            if chunk is None:
                continue
            if isinstance(chunk.get("error"), dict):
                self.error = engine_error(_status_of(chunk["error"]), json.dumps(chunk).encode())
                return
            await self._out(self.writer.chunk(chunk))

    async def _out(self, events: list[Event]) -> None:
        if self.stream and events:
            await self.answer.body(b"".join(sse.event(data, name) for name, data in events))


def _status_of(error: dict[str, Any]) -> int:
    code = error.get("code")
    return code if isinstance(code, int) else 500


# What the gateway checks of every generation request before an engine sees it, by route.
GENERATION_CHECKS = {**protocol.CHECKS, **CHECKS}
