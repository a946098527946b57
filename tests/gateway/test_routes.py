"""The gateway's refusals of a request's path or method, in process: they come before
the key is read, so no database or engine is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from llamaserve.config import Settings, base_layout
from llamaserve.gateway.app import Gateway
from llamaserve.gateway.exchange import Services
from llamaserve.gateway.logbook import RequestLog
from tests.conftest import ROOT
from tests.gateway.helpers import assert_envelope

pytestmark = pytest.mark.anyio


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    """A gateway without its lifespan (no database, no key checked): its request rows
    are kept, never written."""
    settings = Settings(_env_file=None, llama_runtime_dir=tmp_path)  # type: ignore[call-arg]
    built = Gateway(settings, base_layout(ROOT, tmp_path))
    built.requests = RequestLog(None, tmp_path / "spool")
    unused: Any = None  # never reached: a wrong route or method is refused first
    built.services = Services(
        max_body=settings.llama_proxy_max_body_bytes,
        auth=unused,
        admissions=unused,
        slots=unused,
        upstream=built.upstream,
        in_flight=built.in_flight,
        requests=built.requests,
        stored=unused,
        quotas=unused,
        metrics=built.metrics,
    )
    return built


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
     ("POST", "/v1/models", "GET"), ("DELETE", "/v1/models/some-model", "GET"),
     ("POST", "/v1/responses/resp_1", "GET, DELETE")],
)  # fmt: skip
async def test_a_wrong_method_is_405_naming_the_routes_method(
    gateway: Gateway, method: str, path: str, allow: str
) -> None:
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.request(method, path)
    assert_envelope(response, 405)
    assert response.headers.get_list("allow") == [allow]


async def test_a_wrong_method_on_anthropics_route_is_405_in_its_envelope(gateway: Gateway) -> None:
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/v1/messages")
    assert response.status_code == 405 and response.headers.get_list("allow") == ["POST"]
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("method", "path"), [("POST", "/health"), ("DELETE", "/ready")])
async def test_health_and_readiness_take_get_only(gateway: Gateway, method: str, path: str) -> None:
    """They answered 200 to any method."""
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.request(method, path)
        health = await client.get("/health")
    assert_envelope(response, 405, proxied=False)
    assert response.headers.get_list("allow") == ["GET"]
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
