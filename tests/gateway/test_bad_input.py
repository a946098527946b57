"""Bad input through the gateway: the request line to the engine holds none of the
client's bytes undecoded, a body is checked as the engines check it, and nothing a client
sends is a 5xx: against the real stack, each engine, and the gateway's own checks of a
body in process (a site: a real database, the mock engine)."""

from __future__ import annotations

import json

import httpx
import pytest
from bench.mock_engine import MODEL

from tests.conftest import exchange
from tests.engine.test_bad_input import BAD_BODIES, usage_of_stream
from tests.gateway.conftest import Stack
from tests.gateway.harness import Site
from tests.gateway.helpers import assert_envelope

INJECTION = "/v1/models/x%20HTTP/1.1%0d%0aHost:%20a%0d%0a%0d%0aGET%20/v1/models/M"


def raw_get(url: str, key: str, target: str) -> bytes:
    """A GET of `target` exactly as given (no client library re-encodes it): the answer."""
    host = url.removeprefix("http://").split(":")[0]
    request = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
               "Connection: close\r\n\r\n")  # fmt: skip
    return exchange(url, request.encode(), timeout=60)


def test_a_path_cannot_write_a_second_request_to_the_engine(stack: Stack, alice: str) -> None:
    """The decoded path was written into the request line: the engine read two requests
    (the second with the engine's key) and later answers went to the wrong clients."""
    answer = raw_get(stack.gateway_url, alice, INJECTION)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    error = json.loads(body)["error"]
    assert error["code"] == "model_not_found"
    assert "x HTTP/1.1\r\nHost: a" in error["message"]  # one model id, whole
    client = stack.client(alice)
    for word in ("one", "two", "three"):
        assert client.models.retrieve(stack.model).id == stack.model
        completion = client.completions.create(
            model=stack.model, prompt=word, max_tokens=2, echo=True, temperature=0
        )
        assert completion.choices[0].text.startswith(word)  # its own answer


@pytest.mark.parametrize("model", ["%E2%80%A8", "%F0%9F%A6%99", "%ff", "%00", "a%0d%0ab"])
def test_a_model_id_of_any_bytes_is_not_found(stack: Stack, alice: str, model: str) -> None:
    headers = {"Authorization": f"Bearer {alice}"}
    response = httpx.get(f"{stack.gateway_url}/v1/models/{model}", headers=headers, timeout=30)
    assert assert_envelope(response, 404)["code"] == "model_not_found"


@pytest.mark.anyio
@pytest.mark.parametrize("name", BAD_BODIES)
async def test_a_body_no_engine_can_take_is_a_400_at_the_gateway(site: Site, name: str) -> None:
    alice = site.create_user("alice-bad-input")
    body = BAD_BODIES[name].replace(b"%s", MODEL.encode())
    async with site.gateway() as gateway:
        answer = await gateway.post("/v1/chat/completions", content=body, headers=auth(alice))
    assert assert_envelope(answer, 400)["type"] == "invalid_request_error"
    assert site.engine.arrivals == []  # refused by the gateway itself


@pytest.mark.anyio
async def test_stream_options_are_checked_as_the_engines_check_them(site: Site) -> None:
    alice = site.create_user("alice-bad-input")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
            "stream": True, "stream_options": {"include_usage": "yes"}}  # fmt: skip
    async with site.gateway() as gateway:
        answer = await gateway.post("/v1/chat/completions", json=body, headers=auth(alice))
    assert assert_envelope(answer, 400)["param"] == "stream_options.include_usage"
    assert site.engine.arrivals == []


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def test_max_tokens_is_the_one_bound_through_the_gateway(stack: Stack, alice: str) -> None:
    for lengths in ({"max_tokens": 4, "n_predict": 64}, {"max_tokens": 4, "n_predict": -1}):
        usage = usage_of_stream(stack.gateway_url, alice, model=stack.model, **lengths)
        assert 1 <= usage["completion_tokens"] <= 4
