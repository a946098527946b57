"""Extra gateways on the stack's database, and a mock engine for fault injection."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from tests.conftest import ROOT, free_port
from tests.gateway.conftest import Stack


@contextmanager
def extra_gateway(stack: Stack, **env: str) -> Iterator[str]:
    """Another gateway process on the same database, with settings overridden by env."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamaserve", "serve-gateway"],
        cwd=ROOT,
        env={**stack.project.env, "LLAMA_PROXY_PORT": str(port), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()


def wait_for(url: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    for _ in range(300):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


async def mock_engine(scope: Scope, receive: Receive, send: Send) -> None:
    """An OpenAI-ish engine whose `model` field picks a fault: hang, cut, or none."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
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
