"""The front of the llama-server engine: an ASGI proxy that answers like our mended
llama_cpp.server.

It serves OpenAI's routes and `GET /health` on LLAMA_SERVER_HOST:LLAMA_SERVER_PORT,
checks the key itself and relays to llama-server on a private loopback port, whose own
routes (`/slots`, `/props`, ...) it never exposes. Requests are rewritten and answers
translated by `translate`; every failure of llama-server or of the connection to it is
mapped to the error family here, and nowhere else. A client that goes away closes the
stream from llama-server, which frees the slot at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from llamaserve.engine.answers import model_list
from llamaserve.engine.protocol import (
    CHECKS,
    check_route_and_key,
    no_embeddings,
    parse_request,
    read_body,
    retrieve_model,
    send_json,
)
from llamaserve.engine.readback import ReadBack
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
    ServiceUnavailable,
    UpstreamFailed,
    engine_error,
    send_error,
    sse_error_event,
)
from llamaserve.routes import check_method, model_of

Hook = Callable[[], Awaitable[None]]


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
        on_startup: Hook | None = None,
        on_shutdown: Hook | None = None,
    ) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.model_id = model_id
        self.created = created  # of the model, in its listing
        self.slots = slots
        self.native_tools = native_tools
        self._key = api_key.get_secret_value().encode()
        self._auth = {"Authorization": f"Bearer {api_key.get_secret_value()}"}
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                await self._route(scope, receive, send)
            except APIError as error:
                await send_error(send, error)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._open()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _open(self) -> None:
        if self._on_startup is not None:
            await self._on_startup()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        # llama-server closes the connection after each streamed answer without saying so:
        # a pooled connection would fail the next request. Loopback connects are cheap.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)

    async def _close(self) -> None:
        try:
            if self._on_shutdown is not None:
                await self._on_shutdown()
        finally:
            if self._session is not None:
                await self._session.close()

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/health":
            check_method(path, method, "GET")
            await self._health(send)
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
            body = parse_request(await read_body(receive), self.model_id)
            CHECKS[path](body)
            if (read_back := ReadBack.of(body)) is not None:
                await self._read_back(read_back, send)
                return
            translator = self._translator(path, body)
            await until_disconnected(self._generate(path, translator, send), receive)

    async def _models(self) -> dict[str, Any]:
        return model_list(await self._call("GET", "/v1/models"), self.created)

    async def _health(self, send: Send) -> None:
        async with self._request("GET", "/health") as response:
            raw = await response.read()
        if response.status != 200:
            raise engine_error(response.status, raw)
        await send_json(send, {"status": "ok", "slots": self.slots})

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A request that does not generate: llama-server's JSON answer."""
        async with self._request(method, path, body) as response:
            raw = await response.read()
        if response.status != 200:
            raise engine_error(response.status, raw)
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def _translator(self, path: str, body: dict[str, Any]) -> Translator:
        if path == "/v1/chat/completions":
            return chat_translator(body, native_tools=self.native_tools)
        return completion_translator(body)

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
        reply = Reply(send, translator)
        try:
            if translator.echo_tokens is not None:
                translator.echo = await self._text_of(translator.echo_tokens)
            async with self._request("POST", path, translator.body) as response:
                if response.status != 200:
                    raise engine_error(response.status, await response.read())
                async for chunk in events(response):
                    translated = translator.chunk(chunk)
                    if translated is not None:
                        await reply.chunk(translated)
            await reply.finish()
        except APIError as error:
            await reply.fail(error)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            await reply.fail(InternalError(f"The relay failed: {type(exc).__name__}."))

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request to llama-server; an unfinished answer drops the connection on exit."""
        assert self._session is not None, "the relay's lifespan has not started"
        url = self.upstream_url + path
        with map_errors():
            response = await self._session.request(method, url, json=body, headers=self._auth)
        try:
            with map_errors():
                yield response
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()  # llama-server sees the client go and stops generating


class Reply:
    """The client's answer: relayed chunk by chunk, or assembled when it did not stream."""

    def __init__(self, send: Send, translator: Translator) -> None:
        self._send = send
        self._translator = translator
        self._assembler = None if translator.stream else Assembler(translator.kind)
        self.started = False

    async def chunk(self, chunk: dict[str, Any]) -> None:
        if self._assembler is not None:
            self._assembler.add(chunk)
        else:
            await self._event(chunk)

    async def finish(self) -> None:
        if self._assembler is not None:
            await send_json(self._send, self._assembler.result(self._translator.usage))
            return
        usage = self._translator.usage_chunk()
        if usage is not None:
            await self._event(usage)
        await self._body(b"data: [DONE]\n\n", more=False)

    async def fail(self, error: APIError) -> None:
        if self.started:
            await self._body(sse_error_event(error), more=False)
        else:
            await send_error(self._send, error)

    async def _event(self, chunk: dict[str, Any]) -> None:
        await self._body(b"data: " + json.dumps(chunk).encode() + b"\n\n", more=True)

    async def _body(self, data: bytes, *, more: bool) -> None:
        if not self.started:
            self.started = True
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The chunks of llama-server's stream, up to `[DONE]`; an error event raises it."""
    async for line in _lines(response):
        field, _, value = line.partition(b":")
        value = value.strip()
        if field == b"data" and value == b"[DONE]":
            return
        if field not in (b"data", b"error"):
            continue  # blank lines between events, and comments such as pings
        payload = json.loads(value)
        error = payload.get("error", payload) if field == b"error" else payload.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            status = code if isinstance(code, int) else 500
            raise engine_error(status, json.dumps({"error": error}).encode())
        yield payload
    raise UpstreamFailed("llama-server ended the stream before it was complete.")


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    pending = b""
    async for data in response.content.iter_any():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")


@contextmanager
def map_errors() -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise ServiceUnavailable("llama-server is not reachable (starting or stopped).") from exc
    except aiohttp.ClientPayloadError as exc:  # the connection broke mid-answer
        raise UpstreamFailed("llama-server stopped in the middle of the answer.") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(f"llama-server failed ({type(exc).__name__}).") from exc


async def until_disconnected(work: Coroutine[Any, Any, None], receive: Receive) -> None:
    """Run `work` until it ends or the client goes away, whichever comes first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
