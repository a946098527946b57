"""The Responses and Messages routes through a real gateway and database, with the mock
engine behind the engines' own bridge: keys as Anthropic's clients send them, Anthropic's
envelope on its routes, the rate limit, the queue's bounds and its fairness, and stored
responses kept apart per user. The real model: test_apis.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.conftest import ENVELOPE
from tests.gateway.harness import Site
from tests.gateway.helpers import MockEngine, extra_gateway
from tests.gateway.helpers import mock_request as chat

MODEL = "mock"
ANTHROPIC_ERROR = {"type", "error"}


def message(tag: str, delay: float = 0.0) -> dict[str, Any]:
    """A Messages request for the mock engine, tagged by its first message."""
    return {"model": MODEL, "max_tokens": 5, "mock_delay": delay,
            "messages": [{"role": "user", "content": tag}]}  # fmt: skip


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ANTHROPIC_ERROR and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    assert body["error"]["message"] and response.headers["x-request-id"]


@pytest.mark.anyio
async def test_both_apis_answer_through_the_gateway_and_are_logged(site: Site) -> None:
    key = site.create_user("apis")
    async with site.gateway() as gateway:
        messages = await gateway.post(
            "/v1/messages", json=message("m1"), headers={"x-api-key": key}
        )
        responses = await gateway.post(
            "/v1/responses", json={"model": MODEL, "input": "r1"},
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip
    assert messages.status_code == 200 and messages.json()["type"] == "message"
    assert responses.status_code == 200 and responses.json()["object"] == "response"
    for answer, usage in (
        (messages, messages.json()["usage"]),
        (responses, responses.json()["usage"]),
    ):
        row = await site.logged(answer.headers["x-request-id"])
        assert row["outcome"] == "ok" and row["username"] == "apis"
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["input_tokens"], usage["output_tokens"])  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": "lsk_nope"}, {"Authorization": "Bearer lsk_nope"}, {}],
)
async def test_a_wrong_or_missing_key_on_messages_is_anthropics_401(
    site: Site, headers: dict[str, str]
) -> None:
    async with site.gateway() as gateway:
        refused = await gateway.post("/v1/messages", json=message("x"), headers=headers)
        openai_route = await gateway.post("/v1/responses", json={"input": "x"}, headers=headers)
    assert_anthropic_error(refused, 401, "authentication_error")
    assert openai_route.status_code == 401 and set(openai_route.json()["error"]) == ENVELOPE


@pytest.mark.anyio
async def test_the_rate_limit_applies_in_each_apis_envelope(site: Site) -> None:
    key = site.create_user("limited-apis", "--rate-limit", "2", "--window", "600")
    headers = {"x-api-key": key}
    async with site.gateway() as gateway:
        first = await gateway.post("/v1/messages", json=message("m"), headers=headers)
        second = await gateway.post("/v1/responses", json={"model": MODEL, "input": "r"},
                                    headers=headers)  # fmt: skip
        limited = await gateway.post("/v1/messages", json=message("m"), headers=headers)
        limited_too = await gateway.post("/v1/responses", json={"model": MODEL, "input": "r"},
                                         headers=headers)  # fmt: skip
    assert (first.status_code, second.status_code) == (200, 200)
    assert_anthropic_error(limited, 429, "rate_limit_error")
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited_too.status_code == 429
    assert limited_too.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.fixture
def mock_engine() -> Any:
    with MockEngine(slots=1) as mock:
        yield mock


async def send_all(url: str, calls: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    """Each (key, path, body) sent in this order, 50 ms apart, all at once."""
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = []
        for key, path, body in calls:
            request = client.post(f"{url}{path}", json=body, headers={"x-api-key": key})
            tasks.append(asyncio.create_task(request))
            await asyncio.sleep(0.05)
        return list(await asyncio.gather(*tasks))


def test_queue_bounds_answer_429_and_503_in_anthropics_envelope(site: Site) -> None:
    a, b = site.create_user("bounds-ma"), site.create_user("bounds-mb")
    calls = [(a, "/v1/chat/completions", chat("a0", 0.5))]
    calls += [(a, "/v1/messages", message(f"a{i}", 0.5)) for i in (1, 2, 3)]
    calls += [(b, "/v1/messages", message("b1")), (b, "/v1/messages", message("b2"))]
    bounds = {"LLAMA_PROXY_USER_QUEUE_SIZE": "2", "LLAMA_PROXY_QUEUE_SIZE": "3"}
    with extra_gateway(site, **bounds) as url:
        responses = asyncio.run(send_all(url, calls))
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 200, 503]
    assert_anthropic_error(responses[3], 429, "rate_limit_error")
    assert_anthropic_error(responses[5], 503, "overloaded_error")
    assert all(int(responses[i].headers["retry-after"]) > 0 for i in (3, 5))


def test_a_light_users_message_is_not_queued_behind_a_heavy_user(site: Site) -> None:
    heavy, light = site.create_user("heavy-m"), site.create_user("light-m")
    calls = [(heavy, "/v1/responses", {"model": MODEL, "input": f"h{i}", "mock_delay": 0.3})
             for i in range(6)]  # fmt: skip
    calls.append((light, "/v1/messages", message("l1", 0.3)))
    with extra_gateway(site) as url:
        responses = asyncio.run(send_all(url, calls))
    assert all(r.status_code == 200 for r in responses)
    # When l1 arrives one of h's requests is generating and the others wait: l1 is next.
    arrivals = site.engine.arrivals
    assert arrivals.index("l1") <= 2 and arrivals[-1] != "l1"


@pytest.mark.anyio
async def test_stored_responses_are_each_users_own(site: Site) -> None:
    ada, bob = site.create_user("ada-r"), site.create_user("bob-r")
    as_ada, as_bob = {"x-api-key": ada}, {"Authorization": f"Bearer {bob}"}
    async with site.gateway() as gateway:
        first = (await gateway.post("/v1/responses", json={"model": MODEL, "input": "one"},
                                    headers=as_ada)).json()  # fmt: skip
        assert first["store"] is True and first["previous_response_id"] is None
        url = f"/v1/responses/{first['id']}"
        assert (await gateway.get(url, headers=as_ada)).json() == first
        theirs = await gateway.get(url, headers=as_bob)
        unknown = await gateway.get("/v1/responses/resp_unknown", headers=as_bob)
        assert (theirs.status_code, unknown.status_code) == (404, 404)
        assert theirs.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
            "resp_unknown", first["id"])  # fmt: skip
        theirs_continued = {"model": MODEL, "input": "two", "previous_response_id": first["id"]}
        continued = await gateway.post("/v1/responses", json=theirs_continued, headers=as_bob)
        assert continued.status_code == 404 and continued.json()["error"]["param"] == (
            "previous_response_id")  # fmt: skip
        assert (await gateway.delete(url, headers=as_bob)).status_code == 404
        deleted = await gateway.delete(url, headers=as_ada)
        assert deleted.json() == {"id": first["id"], "object": "response", "deleted": True}
        assert (await gateway.get(url, headers=as_ada)).status_code == 404
        assert (await gateway.put(url, headers=as_ada)).status_code == 405


@pytest.mark.anyio
async def test_previous_response_id_sends_the_engine_the_whole_conversation(site: Site) -> None:
    key = {"x-api-key": site.create_user("conversing")}
    async with site.gateway() as gateway:
        first = (await gateway.post("/v1/responses", json={"model": MODEL, "input": "one"},
                                    headers=key)).json()  # fmt: skip
        second = (await gateway.post(
            "/v1/responses", headers=key,
            json={"model": MODEL, "input": "two", "previous_response_id": first["id"]},
        )).json()  # fmt: skip
    assert second["previous_response_id"] == first["id"] and second["store"] is True
    # The mock tags a request by its first message: the first turn's, sent again.
    assert site.engine.arrivals[-2:] == ["one", "one"]


@pytest.mark.anyio
async def test_store_false_or_storing_off_keeps_nothing(site: Site) -> None:
    key = {"x-api-key": site.create_user("forgetful")}
    body = {"model": MODEL, "input": "one"}
    async with site.gateway() as gateway:
        unstored = (await gateway.post("/v1/responses", json={**body, "store": False},
                                       headers=key)).json()  # fmt: skip
        assert unstored["store"] is False
        assert (
            await gateway.get(f"/v1/responses/{unstored['id']}", headers=key)
        ).status_code == 404
    async with site.gateway(llama_proxy_store_responses=False) as gateway:
        off = (await gateway.post("/v1/responses", json=body, headers=key)).json()
        assert off["store"] is False
        assert (await gateway.get(f"/v1/responses/{off['id']}", headers=key)).status_code == 404
    assert (await site.fetch("SELECT count(*) FROM llama_responses"))[0][0] == 0


@pytest.mark.anyio
async def test_hostile_response_ids_and_keys_are_plain_refusals(site: Site) -> None:
    """What a client puts in a stored response's id or in x-api-key reaches the database
    only as a parameter, and never as anything but a 404 or a 401."""
    key = {"x-api-key": site.create_user("hostile-ids")}
    async with site.gateway() as gateway:
        for response_id in ("%00", "%ED%A0%80", "resp_1'%20OR%20'1'='1", "x" * 5000):
            for method in ("GET", "DELETE"):
                answer = await gateway.request(method, f"/v1/responses/{response_id}", headers=key)
                assert answer.status_code == 404, (method, response_id, answer.text)
                assert set(answer.json()["error"]) == ENVELOPE
        body = {"model": MODEL, "input": "x", "previous_response_id": "\u0000\ud800"}
        continued = await gateway.post("/v1/responses", headers=key,
                                       content=json.dumps(body))  # ASCII: \u escapes  # fmt: skip
        assert continued.status_code in (400, 404) and set(continued.json()["error"]) == ENVELOPE
        for bad in (b"lsk_\xff\xfe", b"lsk_a b", b"'; DROP TABLE users; --"):
            refused = await gateway.post("/v1/messages", json=message("x"),
                                         headers={b"x-api-key": bad})  # fmt: skip
            assert_anthropic_error(refused, 401, "authentication_error")
    assert (await site.fetch("SELECT count(*) FROM users"))[0][0] >= 1
