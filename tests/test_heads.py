"""The bounds on a request's head, shared by the gateway's and the engines' servers: the
same answer however the client cuts its writes, and uvicorn's own refusals of heads it
cannot parse in OpenAI's envelope. A small app under the real server, no model."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from llamaserve.http.server import MAX_HEAD_BYTES, bounded_heads
from tests.conftest import free_port, refusal


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(ok, port=port, http=bounded_heads(5.0), log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def head_of(size: int) -> bytes:
    """A whole head of exactly `size` bytes."""
    start, end = b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def status_of(url: str, head: bytes, pieces: int) -> bytes:
    """The status line answered to `head`, sent in `pieces` writes."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        step = -(-len(head) // pieces)
        for at in range(0, len(head), step):
            conn.sendall(head[at : at + step])
            if select.select([conn], [], [], 0.01)[0]:  # answered (and closing): stop
                break
        answer = conn.recv(65536)
    return answer.partition(b"\r\n")[0]


@pytest.mark.parametrize("pieces", [1, 3, 40])
def test_the_head_bound_is_exact_however_the_head_is_cut(url: str, pieces: int) -> None:
    """A 66-100 KB Authorization header in one write was read whole (and answered 401)."""
    assert status_of(url, head_of(MAX_HEAD_BYTES), pieces) == b"HTTP/1.1 200 OK"
    too_large = b"HTTP/1.1 431 Request Header Fields Too Large"
    assert status_of(url, head_of(MAX_HEAD_BYTES + 1), pieces) == too_large
    assert status_of(url, head_of(100_000), pieces) == too_large


def test_a_head_larger_than_the_bound_in_one_write_is_431_in_the_envelope(url: str) -> None:
    head = b"GET / HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + b"k" * 90_000 + b"\r\n\r\n"
    status_line, error = refusal(url, head)
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert error["code"] == "request_header_fields_too_large"


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\nb\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ],
)
def test_a_head_the_server_cannot_parse_is_a_400_in_the_envelope(url: str, head: bytes) -> None:
    status_line, error = refusal(url, head)
    assert status_line == b"HTTP/1.1 400 Bad Request"
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_http_request")
