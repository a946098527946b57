"""The front of the llama-server engine: an ASGI proxy that answers like our mended
llama_cpp.server.

It serves OpenAI's routes and `GET /health` on LLAMA_SERVER_HOST:LLAMA_SERVER_PORT,
checks the key itself and relays to llama-server on a private loopback port, whose own
routes (`/slots`, `/props`, ...) it never exposes. Requests are rewritten and answers
translated by `translate`; every failure of llama-server or of the connection to it is
mapped to the error family here, and nowhere else. A generation waits for room in the KV
pool before it is sent (`room`). A client that goes away closes the stream from
llama-server, which frees the slot at once.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from llamaserve.engine import tally
from llamaserve.engine.fields import model_list
from llamaserve.engine.protocol import (
    CHECKS,
    check_key,
    check_route_and_key,
    no_embeddings,
    parse_request,
    retrieve_model,
)
from llamaserve.engine.readback import ReadBack
from llamaserve.engine.room import Room
from llamaserve.engine.tally import Tallies
from llamaserve.engine.translate import (
    Assembler,
    Translator,
    chat_translator,
    completion_translator,
)
from llamaserve.errors import (
    APIError,
    InternalError,
    InvalidRequest,
    UpstreamFailed,
    engine_error,
)
from llamaserve.http import asgi, sse
from llamaserve.http.answer import Answer, send_error, send_json
from llamaserve.http.upstream import Reply, Upstream
from llamaserve.routes import check_method, model_of


class Relay:
    """The ASGI app; `on_startup`/`on_shutdown` run in its lifespan (the launcher's child)."""

    def __init__(
        self,
        *,
        upstream_url: str,
        api_key: SecretStr,
        model_id: str,
        created: int,
        slots: int,
        native_tools: bool,
        room: Room | None = None,
        on_startup: asgi.Hook | None = None,
        on_shutdown: asgi.Hook | None = None,
    ) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.model_id = model_id
        self.created = created  # of the model, in its listing
        self.slots = slots
        self.native_tools = native_tools
        self.room = room  # None: llama-server's pool is not bounded here
        self._key = api_key.get_secret_value().encode()
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        # Keep-alive connections to llama-server, with our key; no bound on its silences
        # (a long answer that does not stream says nothing until it is whole).
        self._upstream = Upstream(api_key, read_timeout=None, name="llama-server")
        self.tallies = Tallies()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send, self._open, self._close)
        elif scope["type"] == "http":
            try:
                await self._route(scope, receive, send)
            except APIError as error:
                await send_error(send, error)

    async def _open(self) -> None:
        if self._on_startup is not None:
            await self._on_startup()
        await self._upstream.open()

    async def _close(self) -> None:
        try:
            if self._on_shutdown is not None:
                await self._on_shutdown()
        finally:
            await self._upstream.close()

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/health":
            check_method(path, method, "GET")
            await self._call("GET", "/health")
            await send_json(send, {"status": "ok", "slots": self.slots})
            return
        if path.startswith(tally.PREFIX):
            check_method(path, method, "GET")
            check_key(scope, self._key)
            await self.tallies.answer(path, send)
            return
        check_route_and_key(scope, self._key)
        model = model_of(path)
        if path == "/v1/models":
            await send_json(send, await self._models())
        elif model is not None:
            await send_json(send, retrieve_model(await self._models(), model, self.model_id))
        elif path == "/v1/embeddings":
            raise no_embeddings(self.model_id)
        else:
            body = parse_request(await asgi.read_body(receive), self.model_id)
            CHECKS[path](body)
            if (read_back := ReadBack.of(body)) is not None:
                await self._read_back(read_back, send)
                return
            translator = self._translator(path, body)
            if tally.name_of(scope) is not None:  # the gateway may ask for its count
                translator.count_in(self.tallies.open(scope))
            await asgi.until_disconnected(self._generate(path, translator, send), receive)

    async def _models(self) -> dict[str, Any]:
        return model_list(await self._call("GET", "/v1/models"), self.created)

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A request that does not generate: llama-server's JSON answer."""
        data = b"" if body is None else json.dumps(body).encode()
        async with self._upstream.send(self.upstream_url, method, path, data) as reply:
            raw = await reply.read()
        if reply.status != 200:
            raise engine_error(reply.status, raw)
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def _translator(self, path: str, body: dict[str, Any]) -> Translator:
        if path == "/v1/chat/completions":
            return chat_translator(body, native_tools=self.native_tools)
        return completion_translator(body)

    def _room_for(self, body: bytes, max_tokens: int | None) -> AbstractAsyncContextManager[None]:
        """Room in the KV pool for a generation of this body, held until its answer ends."""
        if self.room is None:
            return contextlib.nullcontext()
        return self.room.held(self.room.need(len(body), max_tokens))

    async def _read_back(self, read_back: ReadBack, send: Send) -> None:
        """A completion of no tokens: the prompt's text and count, as llama-server's
        completion would count it (with the BOS it adds to a text, never to token ids)."""
        if isinstance(read_back.prompt, str):
            text = read_back.prompt
            asked = {"content": text, "add_special": True, "parse_special": True}
            count = len((await self._call("POST", "/tokenize", asked))["tokens"])
        else:
            text, count = await self._text_of(read_back.prompt), len(read_back.prompt)
        await read_back.answer(send, text, count)

    async def _text_of(self, tokens: list[int]) -> str:
        """The text of a prompt of token ids. An id outside the vocabulary is refused as a
        completion refuses it (400): llama-server's /detokenize fails on it with a 500."""
        listing = await self._call("GET", "/v1/models")
        models: list[dict[str, Any]] = listing.get("data") or [{}]
        size = (models[0].get("meta") or {}).get("n_vocab")
        if isinstance(size, int) and (bad := [t for t in tokens if not 0 <= t < size]):
            raise InvalidRequest(
                f"Invalid token in prompt: {bad[0]}. Minimum value is 0, maximum value is "
                f"{size - 1} (inclusive).",
                param="prompt",
            )
        detokenized = await self._call("POST", "/detokenize", {"tokens": tokens})
        return str(detokenized.get("content", ""))

    async def _generate(self, path: str, translator: Translator, send: Send) -> None:
        """The answer, relayed chunk by chunk as a stream, or assembled when the client
        did not ask for one; a failure ends it with `Answer.fail`."""
        answer = Answer(send)
        whole = None if translator.stream else Assembler(translator.kind)
        try:
            if translator.echo_tokens is not None:
                translator.echo = await self._text_of(translator.echo_tokens)
            body = json.dumps(translator.body).encode()
            async with (
                self._room_for(body, translator.body.get("max_tokens")),
                self._upstream.send(self.upstream_url, "POST", path, body) as reply,
            ):
                if reply.status != 200:
                    raise engine_error(reply.status, await reply.read())
                async for chunk in chunks(reply):
                    translated = translator.chunk(chunk)
                    if translated is None:
                        continue
                    if whole is not None:
                        whole.add(translated)
                    else:
                        await answer.event(translated)
            if whole is not None:
                await answer.json(whole.result(translator.usage))
                return
            usage = translator.usage_chunk()
            if usage is not None:
                await answer.event(usage)
            await answer.done()
        except APIError as error:
            await answer.fail(error)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            await answer.fail(InternalError(f"The relay failed: {type(exc).__name__}."))
        finally:
            if translator.tally is not None:
                translator.tally.ended = True


async def chunks(reply: Reply) -> AsyncIterator[dict[str, Any]]:
    """The chunks of llama-server's stream, up to `[DONE]`; an error event raises it."""
    async for _, event in sse.events(reply.chunks()):
        if event.done:
            return
        if event.error is not None:
            payload = json.loads(event.error)
            error = payload.get("error", payload) if isinstance(payload, dict) else None
        elif event.data is not None:
            payload = json.loads(event.data)
            error = payload.get("error")
        else:
            continue  # comments, such as pings
        if isinstance(error, dict):
            code = error.get("code")
            status = code if isinstance(code, int) else 500
            raise engine_error(status, json.dumps({"error": error}).encode())
        yield payload
    raise UpstreamFailed("llama-server ended the stream before it was complete.")
