"""A mock OpenAI engine with a fixed delay, for measuring what the gateway itself adds.

Run as its own process (`python -m bench.mock_engine --port N`), so that it shares no
event loop with the load generator. A chat completion answers after `--delay-ms`; a
stream sends its first chunk after `--delay-ms`, then `--chunks - 1` more every
`--chunk-ms`, the usage chunk when asked for (`stream_options.include_usage`), and
`[DONE]`. `/health` reports `--slots`, so that the gateway's fair queue holds nothing
back at the concurrency measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

MODEL = "mock"
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


@dataclass(frozen=True)
class Timing:
    delay: float  # seconds before the answer, or before a stream's first chunk
    chunks: int  # content chunks of a stream, one token each
    chunk_interval: float  # seconds between a stream's chunks


class MockEngine:
    """The ASGI app: /health, /v1/models and /v1/chat/completions."""

    def __init__(self, timing: Timing, slots: int) -> None:
        self.timing = timing
        self.health = json.dumps({"status": "ok", "slots": slots}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            await _answer(send, 200, self.health)
        elif path == "/v1/models":
            models = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
            await _answer(send, 200, json.dumps(models).encode())
        elif path == "/v1/chat/completions" and scope["method"] == "POST":
            request = json.loads(await _body(receive))
            if request.get("stream") is True:
                await self._stream(send, request)
            else:
                await asyncio.sleep(self.timing.delay)
                await _answer(send, 200, json.dumps(_completion()).encode())
        else:
            error = {"error": {"message": "not found", "type": "invalid_request_error"}}
            await _answer(send, 404, json.dumps(error).encode())

    async def _stream(self, send: Send, request: dict[str, Any]) -> None:
        await asyncio.sleep(self.timing.delay)
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        last = self.timing.chunks - 1
        for index in range(self.timing.chunks):
            if index:
                await asyncio.sleep(self.timing.chunk_interval)
            finish = "length" if index == last else None
            await _event(send, _chunk({"content": "tok "} if index < last else {}, finish))
        options = request.get("stream_options") or {}
        if options.get("include_usage") is True:
            await _event(send, {**_chunk({}, None), "choices": [], "usage": _usage(last)})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _completion() -> dict[str, Any]:
    message = {"role": "assistant", "content": "Hello from the mock engine."}
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": _usage(6),
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


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--chunk-ms", type=float, default=5.0)
    parser.add_argument("--slots", type=int, default=64)
    args = parser.parse_args()
    timing = Timing(args.delay_ms / 1000, max(2, args.chunks), args.chunk_ms / 1000)
    uvicorn.run(
        MockEngine(timing, args.slots),
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
