"""A mock OpenAI engine, for the benchmark and the tests: it measures what the gateway
itself adds, and injects the faults the gateway must survive.

The benchmark runs it as its own process (`python -m bench.mock_engine --port N`), so
that it shares no event loop with the load generator; the tests run it in a thread
(`MockEngine(...).start()`, `.kill()`). A chat completion answers after the delay; a
stream sends its status line at once (as the real engines do), its first chunk after the
delay, then a token every `chunk_interval`, the usage chunk when asked for
(`stream_options.include_usage`), and `[DONE]`. `/health` reports `slots`.

With `api_key` set, it also serves the Responses and Messages APIs over its chat, through
the engines' own bridge (`llamaserve.engine.bridge`), as the real engines do.

What a request asks of it: `mock_delay` (seconds) replaces the delay; `mock_tokens` is
the completion tokens its usage reports (of a stream too, whatever its chunks); model "cut" makes
it die after the first chunk of a stream. It records each request's tag (its first
message) in `arrivals`, then in `finished` as it answers, or in `abandoned` if its client
went away during the delay. While `hung` is set, it takes connections and answers nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from llamaserve.engine.bridge import ApiBridge, bridged

MODEL = "mock"
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


@dataclass(frozen=True)
class Timing:
    delay: float = 0.0  # seconds before the answer, or before a stream's first chunk
    chunks: int = 2  # chunks of a stream: one token each, then the one that ends it
    chunk_interval: float = 0.0  # seconds between a stream's chunks


def mock_request(tag: str, delay: float = 0.0, stream: bool = False) -> dict[str, object]:
    """A chat request for MockEngine: tagged by its message, 'generating' for `delay` s."""
    messages = [{"role": "user", "content": tag}]
    return {"model": MODEL, "messages": messages, "mock_delay": delay, "stream": stream}


class MockEngine:
    """The ASGI app: /health, /v1/models, /v1/chat/completions and, with `api_key`, the
    bridged APIs; anything else is 404."""

    def __init__(
        self, slots: int = 1, timing: Timing | None = None, port: int | None = None
    ) -> None:
        self.slots = slots
        self.timing = timing or Timing()
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.arrivals: list[str] = []
        self.finished: list[str] = []
        self.abandoned: list[str] = []
        self.bounds: list[tuple[str, Any]] = []  # (tag, max_tokens) of each request
        self.record = True  # the benchmark's process keeps no tags
        self.hung = False
        self.api_key: str | None = None  # set: the bridged APIs are served, with this key
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while self.hung:
            await asyncio.sleep(0.05)
        path = scope["path"]
        if path == "/health":
            await _answer(send, 200, {"status": "ok", "slots": self.slots})
        elif path == "/v1/models":
            await _answer(send, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        elif path == "/v1/chat/completions" and scope["method"] == "POST":
            await self._generate(json.loads(await _body(receive)), receive, send)
        elif bridged(path) and self.api_key is not None:
            key = SecretStr(self.api_key)
            await ApiBridge(self, api_key=key, model_id=MODEL)(scope, receive, send)
        else:
            await _answer(send, 404, {"error": {"message": "not found",
                                                "type": "invalid_request_error"}})  # fmt: skip

    async def _generate(self, request: dict[str, Any], receive: Receive, send: Send) -> None:
        tag = str(request["messages"][0]["content"])
        self._note(self.arrivals, tag)
        if self.record:
            self.bounds.append((tag, request.get("max_tokens")))
        stream = request.get("stream") is True
        if stream:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
        if not await self._wait(request.get("mock_delay", self.timing.delay), receive):
            self._note(self.abandoned, tag)
            return
        self._note(self.finished, tag)  # before its answer: its client sees it there
        if stream:
            await self._stream(send, request)
        else:
            await _answer(
                send, 200, _completion(request.get("mock_tokens", self.timing.chunks - 1))
            )

    async def _wait(self, delay: float, receive: Receive) -> bool:
        """Wait `delay` s; False if the client went away meanwhile."""
        if not delay:
            return True
        gone = asyncio.ensure_future(_disconnected(receive))
        done, _ = await asyncio.wait({gone}, timeout=delay)
        gone.cancel()
        return not done

    async def _stream(self, send: Send, request: dict[str, Any]) -> None:
        last = self.timing.chunks - 1
        for index in range(self.timing.chunks):
            if index:
                await asyncio.sleep(self.timing.chunk_interval)
            finish = "stop" if index == last else None
            await _event(send, _chunk({"content": "tok "} if index < last else {}, finish))
            if request.get("model") == "cut":
                raise RuntimeError("the engine died mid-stream")
        options = request.get("stream_options") or {}
        if options.get("include_usage") is True:
            usage = _usage(request.get("mock_tokens", last))
            await _event(send, {**_chunk({}, None), "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def _note(self, tags: list[str], tag: str) -> None:
        if self.record:
            tags.append(tag)

    def start(self) -> MockEngine:
        """Serve in a thread of this process (the tests' engine) until `kill`."""
        config = uvicorn.Config(self, port=self.port, log_level="critical", lifespan="off",
                                timeout_graceful_shutdown=5)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """Stop serving (idempotent): its port refuses connections from then on."""
        self.hung = False
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> MockEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _completion(tokens: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": "Hello from the mock engine."}
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": _usage(tokens),
    }


def _chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [choice]}  # fmt: skip


def _usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": 8, "completion_tokens": completion, "total_tokens": 8 + completion}


async def _event(send: Send, payload: dict[str, Any]) -> None:
    body = b"data: " + json.dumps(payload).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _answer(send: Send, status: int, payload: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def _body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--chunk-ms", type=float, default=5.0)
    parser.add_argument("--slots", type=int, default=64)
    args = parser.parse_args()
    timing = Timing(args.delay_ms / 1000, max(2, args.chunks), args.chunk_ms / 1000)
    engine = MockEngine(args.slots, timing, args.port)
    engine.record = False
    uvicorn.run(
        engine,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=1024,
    )


if __name__ == "__main__":
    main()
