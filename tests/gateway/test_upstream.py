"""The gateway's HTTP client to the engines, against scripted engines on real sockets:
keep-alive, connections the engine closed, answers cut short, silence, streaming as
written, and the engine told when its client leaves. Each test runs on asyncio's own
event loop and on uvloop (the gateway's)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop
from pydantic import SecretStr

from llamaserve.errors import InvalidRequest, ServiceUnavailable, UpstreamFailed, UpstreamTimeout
from llamaserve.http.upstream import Upstream
from tests.conftest import free_port

KEY = "engine-secret"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    return asyncio.run if request.param == "asyncio" else uvloop.run  # type: ignore[no-any-return]


@asynccontextmanager
async def engine(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[int]]]:
    """A scripted engine: `handler` gets each connection and its number (from 1)."""
    connections: list[int] = []

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections) + 1)
        try:
            await handler(reader, writer, len(connections))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", connections


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def answer(body: bytes, *headers: bytes) -> bytes:
    lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", *headers]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def upstream(timeout: float = 5.0) -> Upstream:
    return Upstream(SecretStr(KEY), timeout)


async def post(client: Upstream, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    async with client.send(url, "POST", "/v1/chat/completions", body) as reply:
        return reply.status, await reply.read()


def test_requests_share_a_kept_alive_connection_with_the_engine_key(run: Any) -> None:
    heads: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head, body = await read_request(reader)
            heads.append(head)
            writer.write(answer(body))

    async def scenario() -> None:
        async with engine(echo) as (url, connections):
            client = upstream()
            for i in range(3):
                assert await post(client, url, b'{"n": %d}' % i) == (200, b'{"n": %d}' % i)
            await client.close()
            assert connections == [1]
        assert all(f"Authorization: Bearer {KEY}".encode() in head for head in heads)

    run(scenario())


def test_an_engine_url_with_a_path_prefixes_every_request(run: Any) -> None:
    heads: list[bytes] = []

    async def records(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        heads.append((await read_request(reader))[0])
        writer.write(answer(b"{}"))

    async def scenario() -> None:
        async with engine(records) as (url, _):
            assert await post(upstream(), url + "/engine-a/") == (200, b"{}")
        port = url.rpartition(":")[2]
        request_line, host = heads[0].split(b"\r\n")[:2]
        assert request_line == b"POST /engine-a/v1/chat/completions HTTP/1.1"
        assert host == f"Host: 127.0.0.1:{port}".encode()

    run(scenario())


def test_a_connection_the_engine_closed_as_idle_is_sent_again_on_a_new_one(run: Any) -> None:
    """The engine closes a kept-alive connection as the next request arrives on it (its
    idle timeout racing the request): the request goes again, on a new connection."""

    async def closes_after_one(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        await read_request(reader)
        writer.write(answer(b'{"connection": %d}' % number))
        await writer.drain()
        if number == 1:
            await reader.read(1)  # the next request arrives: close without reading it

    async def scenario() -> None:
        async with engine(closes_after_one) as (url, connections):
            client = upstream()
            assert await post(client, url) == (200, b'{"connection": 1}')
            assert await post(client, url) == (200, b'{"connection": 2}')
            assert connections == [1, 2]
            await client.close()

    run(scenario())


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/x HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/models/M",
        "/v1/models/x\nGET /v1/models/M",
        "/v1/models/\x00",
        "/v1/models/\u2028",
        "v1/models",
    ],
)
def test_a_request_line_that_could_carry_a_second_request_is_never_written(
    run: Any, path: str
) -> None:
    """Only printable ASCII without spaces reaches the request line: a CR/LF there would
    write a second request, with the engine's key, whose answer another user would read."""

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        raise AssertionError("the engine was connected to")

    async def scenario() -> None:
        async with engine(never) as (url, connections):
            with pytest.raises(InvalidRequest, match="cannot be forwarded"):
                async with upstream().send(url, "GET", path, b""):
                    pass
            assert connections == []

    run(scenario())


def test_bytes_after_an_answer_are_never_read_as_the_next_ones(run: Any) -> None:
    """An engine that sent more than its answer (a second answer it was tricked into): the
    connection is closed, and the next request has its own answer on a new one."""

    async def talkative(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        while True:
            await read_request(reader)
            stray = answer(b'{"stray": true}') if number == 1 else b""
            writer.write(answer(b'{"connection": %d}' % number) + stray)

    async def scenario() -> None:
        async with engine(talkative) as (url, connections):
            client = upstream()
            assert await post(client, url) == (200, b'{"connection": 1}')
            assert await post(client, url) == (200, b'{"connection": 2}')
            assert await post(client, url) == (200, b'{"connection": 2}')
            assert connections == [1, 2]
            await client.close()

    run(scenario())


def test_a_body_without_a_length_ends_with_the_connection(run: Any) -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"whole": ')
        await writer.drain()
        writer.write(b"true}")

    async def scenario() -> None:
        async with engine(http10) as (url, _):
            assert await post(upstream(), url) == (200, b'{"whole": true}')

    run(scenario())


def test_an_interim_answer_is_skipped_for_the_answer_after_it(run: Any) -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
        await writer.drain()
        writer.write(answer(b'{"final": true}'))

    async def scenario() -> None:
        async with (
            engine(hints) as (url, _),
            upstream().send(url, "POST", "/v1/completions", b"{}") as reply,
        ):
            assert (reply.status, reply.content_type) == (200, "application/json")
            assert await reply.read() == b'{"final": true}'

    run(scenario())


def test_an_answer_cut_short_is_an_upstream_failure(run: Any) -> None:
    async def cuts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(answer(b'{"choices": [{"text": "a long answer"}]}')[:-10])

    async def scenario() -> None:
        async with engine(cuts) as (url, _):
            with pytest.raises(UpstreamFailed, match="mid-answer"):
                await post(upstream(), url)

    run(scenario())


def test_an_engine_silent_past_the_timeout_is_an_upstream_timeout(run: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async def scenario() -> None:
        async with engine(silent) as (url, _):
            with pytest.raises(UpstreamTimeout):
                await post(upstream(timeout=0.3), url)

    run(scenario())


def test_an_engine_that_is_not_listening_is_unavailable(run: Any) -> None:
    async def scenario() -> None:
        with pytest.raises(ServiceUnavailable, match="not reachable"):
            await post(upstream(), f"http://127.0.0.1:{free_port()}")

    run(scenario())


def test_an_engine_that_takes_no_connection_in_time_is_unavailable(run: Any) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so a
    # connection neither succeeds nor fails, as with an engine host that went away.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))

        async def scenario() -> None:
            client = Upstream(SecretStr(KEY), 5.0, connect_timeout=0.3)
            began = time.monotonic()
            with pytest.raises(ServiceUnavailable, match=r"no connection within 0\.3s"):
                await post(client, f"http://127.0.0.1:{port}")
            assert time.monotonic() - began < 3  # the connect timeout, not the read timeout

        try:
            run(scenario())
        finally:
            for filler in fillers:
                filler.close()


def test_a_stream_is_relayed_as_written_and_an_unfinished_one_tells_the_engine(
    run: Any,
) -> None:
    """The engine writes its second event only once the first has reached the client
    (a client that buffered would wait forever); the client then leaves mid-stream, and
    the engine sees its connection end."""
    relayed = asyncio.Event()
    engine_saw_the_end = asyncio.Event()

    async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        for event in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await relayed.wait()
            relayed.clear()
        if await reader.read(1) == b"":
            engine_saw_the_end.set()

    async def scenario() -> None:
        async with engine(streams) as (url, _):
            client = upstream()
            received = []
            async with client.send(url, "POST", "/v1/chat/completions", b"{}") as reply:
                assert (reply.status, reply.content_type) == (200, "text/event-stream")
                async for chunk in reply.chunks():
                    received.append(chunk)
                    relayed.set()
                    if len(received) == 2:
                        break
            assert received == [b"data: one\n\n", b"data: two\n\n"]
            await asyncio.wait_for(engine_saw_the_end.wait(), 1)

    run(scenario())


def test_an_answer_larger_than_the_buffer_arrives_whole_to_a_slow_reader(run: Any) -> None:
    """Reading from the engine pauses while the relay is behind, and resumes."""
    body = bytes(range(256)) * 8192  # 2 MiB

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(answer(body))
        await writer.drain()

    async def scenario() -> None:
        async with engine(large) as (url, _):
            received = bytearray()
            async with upstream().send(url, "POST", "/v1/completions", b"{}") as reply:
                async for chunk in reply.chunks():
                    received += chunk
                    await asyncio.sleep(0.001)
            assert received == body

    run(scenario())


def test_an_https_engine_is_reached_over_tls_and_its_certificate_checked(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "engine.pem", tmp_path / "engine.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        _, body = await read_request(reader)
        writer.write(answer(body))

    async def scenario(trusted: bool) -> None:
        async with engine(echo, tls) as (url, _):
            if trusted:
                assert await post(upstream(), url, b'{"tls": 1}') == (200, b'{"tls": 1}')
            else:
                with pytest.raises(ServiceUnavailable, match="not reachable"):
                    await post(upstream(), url)

    run(scenario(trusted=False))  # a certificate nobody vouches for
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the operator's CA bundle
    run(scenario(trusted=True))
