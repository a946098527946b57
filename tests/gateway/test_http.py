"""The gateway's HTTP: an answer goes out in one piece, its status line and headers
with its body (uvicorn writes them apart, which wakes a client twice per answer); the
gateway may open as many files (connections) as the system lets it."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import socket
from pathlib import Path

from tests.gateway.conftest import Stack
from tests.gateway.helpers import running_gateway


def test_an_answer_goes_out_in_one_piece(stack: Stack, alice: str) -> None:
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    body = json.dumps({"model": stack.model, "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 2}).encode()  # fmt: skip
    requests = [
        f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {alice}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    ]
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        for request in requests:
            conn.sendall(request)
            first = conn.recv(1 << 20)  # what the first send of the answer carried
            head, _, content = first.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )  # fmt: skip
            assert head.startswith(b"HTTP/1.1 200") and len(content) == length
            assert json.loads(content)


def test_the_gateway_raises_its_open_files_limit(stack: Stack) -> None:
    """A usual soft limit is 1024 open files: a few hundred streams (a client's and an
    engine's connection each) would exhaust it. The gateway raises it to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.ExitStack() as running:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what the gateway inherits
        try:
            _, proc = running.enter_context(running_gateway(stack.project.env))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)\s+(\S+)", limits, re.M)
    assert found, limits
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert int(found[1]) == expected > 256
