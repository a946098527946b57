"""The gateway's HTTP: an answer goes out in one piece, its status line and headers
with its body (uvicorn writes them apart, which wakes a client twice per answer)."""

from __future__ import annotations

import json
import socket

from tests.gateway.conftest import Stack


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
