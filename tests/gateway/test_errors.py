"""The contract: every error path answers OpenAI's envelope with the right status. The
gateway's own refusals on a site (a real database, the mock engine), in process or, for
what its HTTP server does, as a process; the engine's refusals through the stack."""

from __future__ import annotations

import http.client
import json
import socket
import time

import httpx
import pytest
from bench.mock_engine import MODEL

from tests.conftest import free_port, refusal
from tests.gateway.conftest import Stack
from tests.gateway.harness import Site
from tests.gateway.helpers import ENVELOPE, assert_envelope, extra_gateway, mock_request, post


async def apost(gateway: httpx.AsyncClient, key: str, content: bytes | str) -> httpx.Response:
    """`post`, to a gateway in process."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return await gateway.post("/v1/chat/completions", content=content, headers=headers)


@pytest.mark.anyio
async def test_malformed_json_is_400(site: Site) -> None:
    alice = site.create_user("alice-errors")
    async with site.gateway() as gateway:
        assert_envelope(await apost(gateway, alice, b"{not json"), 400)
        assert_envelope(await apost(gateway, alice, b"[1, 2]"), 400)
    assert site.engine.arrivals == []


def test_invalid_parameters_are_400_from_the_engine(stack: Stack, alice: str) -> None:
    bad = {"model": stack.model, "messages": "not a list"}
    error = assert_envelope(post(stack.gateway_url, alice, json.dumps(bad)), 400)
    assert error["param"] == "messages"


@pytest.mark.anyio
async def test_body_over_the_limit_is_413(site: Site) -> None:
    alice = site.create_user("alice-errors")
    async with site.gateway(llama_proxy_max_body_bytes=2048) as gateway:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 4096}]})
        refused = await apost(gateway, alice, big)
        assert_envelope(refused, 413)
        row = await site.logged(refused.headers["x-request-id"])  # the user's, though refused
        assert row["username"] and (row["status"], row["outcome"]) == (413, "rejected")
        # Without a valid key, the body is not read: 401.
        assert_envelope(await apost(gateway, "lsk_0123456789_" + "x" * 43, big), 401)


@pytest.mark.anyio
async def test_unknown_path_404_and_wrong_method_405(site: Site) -> None:
    async with site.gateway() as gateway:
        assert_envelope(await gateway.get("/v2/nothing"), 404)
        assert_envelope(await gateway.get("/v1/chat/completions"), 405)


def test_a_websocket_upgrade_is_an_ordinary_request(site: Site) -> None:
    alice = site.create_user("alice-errors")
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    headers = {"Authorization": f"Bearer {alice}", **upgrade}
    with extra_gateway(site) as url:  # uvicorn's own handling of an upgrade: a real server
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
        unknown = httpx.get(f"{url}/v1/realtime", headers=headers, timeout=30)
        assert_envelope(unknown, 404)


def test_an_idle_client_connection_outlives_the_clients_keep_alive(site: Site) -> None:
    """The OpenAI SDK's client keeps an idle connection 5 s; the gateway must not close
    it first, or a request sent just then meets a closing connection."""
    with extra_gateway(site) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            for turn in range(2):
                if turn:
                    time.sleep(6)  # idle beyond the client's keep-alive and uvicorn's default
                conn.request("GET", "/health")  # on the same connection, idle meanwhile
                answer = conn.getresponse()
                assert (answer.status, answer.read()) == (200, b'{"status": "ok"}')
        finally:
            conn.close()


def test_a_request_head_over_64_kib_is_431(site: Site) -> None:
    """Headers are bounded before they are parsed whole: the head is refused once 64 KiB
    came without its end, with the envelope, and the connection is closed."""
    alice = site.create_user("alice-errors")
    head = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * (66 * 1024)
    with extra_gateway(site) as url:
        status_line, error = refusal(url, head)  # its end never comes
        assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert error["code"] == "request_header_fields_too_large"

        big_but_fine = {"Authorization": f"Bearer {alice}", "X-Big": "a" * (32 * 1024)}
        models = httpx.get(f"{url}/v1/models", headers=big_but_fine, timeout=30)
        assert models.status_code == 200


def test_a_request_head_not_whole_within_the_header_timeout_is_408(site: Site) -> None:
    """A client that never ends its request's head gets 408 and its connection is
    closed; one that sends nothing is closed. A slow answer and an idle kept-alive
    connection are not the head's time."""
    alice = site.create_user("alice-errors")
    with extra_gateway(site, LLAMA_HEADER_TIMEOUT="1") as url:
        status_line, error = refusal(url, b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout"
        assert error["code"] == "request_timeout"

        host, port = url.removeprefix("http://").split(":")

        with socket.create_connection((host, int(port)), timeout=10) as conn:
            assert conn.recv(65536) == b""  # closed, nothing said

        kept = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            slow = json.dumps(mock_request("slow", delay=2))
            headers = {"Authorization": f"Bearer {alice}",
                       "Content-Type": "application/json"}  # fmt: skip
            kept.request("POST", "/v1/chat/completions", slow, headers)
            answer = kept.getresponse()
            assert (answer.status, json.loads(answer.read())["id"]) == (200, "chatcmpl-mock")
            time.sleep(1.5)  # idle, longer than the header timeout
            kept.request("GET", "/v1/models", headers=headers)
            models = kept.getresponse()
            assert models.status == 200 and json.loads(models.read())["data"]
        finally:
            kept.close()


def test_unknown_model_is_404(stack: Stack, alice: str) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    error = assert_envelope(post(stack.gateway_url, alice, json.dumps(body)), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.anyio
async def test_engine_unreachable_is_503(site: Site) -> None:
    alice = site.create_user("alice-errors")
    dead = f"http://127.0.0.1:{free_port()}"
    async with site.gateway(llama_server_backend_url=dead) as gateway:
        response = await gateway.get("/v1/models", headers={"Authorization": f"Bearer {alice}"})
        assert assert_envelope(response, 503)["code"] == "engine_unavailable"
        assert response.headers["retry-after"] == "5"
        row = await site.logged(response.headers["x-request-id"])
        assert row["outcome"] == "error" and row["status"] == 503
        assert_envelope(await gateway.get("/ready"), 503, proxied=False)


@pytest.mark.anyio
async def test_engine_timeout_is_504(site: Site) -> None:
    alice = site.create_user("alice-errors")
    async with site.gateway(llama_proxy_upstream_timeout=1) as gateway:
        response = await apost(gateway, alice, json.dumps(mock_request("hang", delay=3)))
        assert_envelope(response, 504)


@pytest.mark.anyio
async def test_a_stream_that_breaks_ends_with_an_error_event_then_done(site: Site) -> None:
    alice = site.create_user("alice-errors")
    async with site.gateway() as gateway:
        body = {**mock_request("Hi", stream=True), "model": "cut"}  # it dies mid-stream
        response = await apost(gateway, alice, json.dumps(body))
        assert response.status_code == 200
        events = [e for e in response.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert set(error) == ENVELOPE
        row = await site.logged(response.headers["x-request-id"])
        assert row["outcome"] == "error" and row["error"]


@pytest.mark.anyio
async def test_over_the_limit_is_429_with_retry_after(site: Site) -> None:
    key = site.create_user("errors-limited", "--rate-limit", "1", "--window", "600")
    headers = {"Authorization": f"Bearer {key}"}
    async with site.gateway() as gateway:
        await gateway.get("/v1/models", headers=headers)
        response = await gateway.get("/v1/models", headers=headers)
    assert_envelope(response, 429)
    assert int(response.headers["retry-after"]) > 0
