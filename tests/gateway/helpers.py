"""Extra gateways on the stack's database, and a mock engine for fault injection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from llamaserve.ops.readiness import Start, wait_until_ready
from tests.conftest import ENVELOPE, ROOT, free_port
from tests.gateway.conftest import Stack


@contextmanager
def extra_gateway(stack: Stack, **env: str) -> Iterator[str]:
    """Another gateway process on the same database, with settings overridden by env."""
    with gateway_process(stack.project.env, **env) as url:
        yield url


@contextmanager
def gateway_process(project_env: dict[str, str], **env: str) -> Iterator[str]:
    """A gateway process of a project (its environment), on a port of its own."""
    with running_gateway(project_env, **env) as (url, _):
        yield url


@contextmanager
def running_gateway(
    project_env: dict[str, str], log: IO[bytes] | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A gateway process and its URL, stopped (SIGTERM) at the end if still running. Its
    log goes to a file (`log`, or a temporary one), not a pipe: a pipe nobody reads
    stalls the gateway once full."""
    port = free_port()
    with contextlib.ExitStack() as files:
        out = log or files.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(
            [sys.executable, "-m", "llamaserve", "serve-gateway"],
            cwd=ROOT,
            env={**project_env, "LLAMA_PROXY_PORT": str(port), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            start = wait_until_ready(url + "/health", proc, 30)
            if start is Start.EXITED:
                out.seek(0)
                raise AssertionError(f"gateway exited: {out.read().decode(errors='replace')}")
            assert start is Start.READY, f"{url} never answered"
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def mock_engine(scope: Scope, receive: Receive, send: Send) -> None:
    """An OpenAI-ish engine whose `model` field picks a fault: hang, cut, or none."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"status": "ok", "slots": 1}'})
        return
    body = await read_body(receive)
    model = json.loads(body).get("model") if body else None
    if model == "hang":
        await asyncio.sleep(3)  # longer than the gateway's timeout in the test
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    choice = {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}
    chunk = {"id": "x", "object": "chat.completion.chunk", "model": "mock", "choices": [choice]}
    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": event, "more_body": True})
    if model == "cut":
        raise RuntimeError("the engine died mid-stream")
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


@contextmanager
def running_mock_engine() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(mock_engine, port=port, log_level="critical", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def mock_request(tag: str, delay: float = 0.0, stream: bool = False) -> dict[str, object]:
    """A chat request for MockEngine: tagged by its message, 'generating' for `delay` s."""
    messages = [{"role": "user", "content": tag}]
    return {"model": "mock", "messages": messages, "mock_delay": delay, "stream": stream}


class MockEngine:
    """A fast fake engine with `slots`, that records what reaches it and can be killed.

    A request's `mock_delay` (seconds) is how long it 'generates'; its first message is
    its tag in `arrivals`, then in `finished` once answered, or in `abandoned` if its
    client (the gateway) went away first. A stream's status line goes out at once.
    """

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self.arrivals: list[str] = []
        self.finished: list[str] = []
        self.abandoned: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.hung = False  # while True, it takes connections and answers nothing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while self.hung:
            await asyncio.sleep(0.05)
        if scope["path"] == "/health":
            await _send_json(send, {"status": "ok", "slots": self.slots})
        elif scope["path"] == "/v1/models":
            await _send_json(send, {"object": "list", "data": [{"id": "mock", "object": "model"}]})
        else:
            await self._generate(json.loads(await read_body(receive)), receive, send)

    async def _generate(self, request: dict[str, Any], receive: Receive, send: Send) -> None:
        tag = request["messages"][0]["content"]
        self.arrivals.append(tag)
        if request.get("stream"):
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        gone = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({gone}, timeout=request.get("mock_delay", 0))
        if gone.done():
            self.abandoned.append(tag)
            return
        gone.cancel()
        self.finished.append(tag)
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        if not request.get("stream"):
            await _send_json(send, {"id": "m", "object": "chat.completion", "choices": [],
                                    "usage": usage})  # fmt: skip
            return
        choice = {"index": 0, "delta": {"content": tag}, "finish_reason": "stop"}
        chunk = {"id": "m", "object": "chat.completion.chunk", "choices": [choice]}
        events = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
        await send({"type": "http.response.body", "body": events, "more_body": False})

    def start(self) -> MockEngine:
        config = uvicorn.Config(self, port=self.port, log_level="critical")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


async def _send_json(send: Send, payload: dict[str, Any]) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def assert_envelope(
    response: httpx.Response, status: int, proxied: bool = True
) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["content-length"]) == len(response.content)
    error = response.json()["error"]
    assert set(error) == ENVELOPE and isinstance(error["message"], str) and error["message"]
    assert not proxied or response.headers["x-request-id"]
    return error  # type: ignore[no-any-return]


def post(
    url: str, key: str, content: bytes | str, path: str = "/v1/chat/completions"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(url + path, content=content, headers=headers, timeout=60)
