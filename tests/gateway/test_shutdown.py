"""Stopping the gateway (SIGTERM, as `console.sh stop` does) lets the requests in flight
finish: their answers are whole and their rows are written. Through a real gateway and
database, with a fake engine that takes its time (it is the subject)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.gateway.conftest import Stack
from tests.gateway.helpers import MockEngine, mock_request, running_gateway


@pytest.fixture
def engine() -> Iterator[MockEngine]:
    mock = MockEngine(slots=4).start()
    yield mock
    mock.kill()


def chat(url: str, key: str, stream: bool) -> httpx.Response:
    body = mock_request(f"in-flight-{stream}", delay=2, stream=stream)
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_requests_in_flight_finish_when_the_gateway_is_stopped(
    stack: Stack, engine: MockEngine
) -> None:
    key = stack.create_user("shutdown-in-flight")
    env = {"LLAMA_SERVER_BACKEND_URL": engine.url}
    with running_gateway(stack.project.env, **env) as (url, proc), ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(chat, url, key, False), pool.submit(chat, url, key, True)]
        deadline = time.monotonic() + 20
        while len(engine.arrivals) < 2:
            assert time.monotonic() < deadline, "the requests never reached the engine"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        whole, streamed = (answer.result() for answer in answers)
        assert proc.wait(timeout=30) == 0

    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 1
    assert streamed.status_code == 200
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"
    ids = [whole.headers["x-request-id"], streamed.headers["x-request-id"]]
    rows = stack.query("SELECT outcome, status FROM llama_requests WHERE request_id = ANY($1)", ids)
    assert [(row["outcome"], row["status"]) for row in rows] == [("ok", 200)] * 2


def test_requests_still_going_after_the_grace_end_with_an_error_and_keep_their_rows(
    stack: Stack, engine: MockEngine
) -> None:
    # With LLAMA_STOP_TIMEOUT=6 the requests get 3 s; uvicorn's own graceful timeout is 5.
    key = stack.create_user("shutdown-cut-off")
    env = {"LLAMA_SERVER_BACKEND_URL": engine.url, "LLAMA_STOP_TIMEOUT": "6"}
    with running_gateway(stack.project.env, **env) as (url, proc), ThreadPoolExecutor(2) as pool:
        client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)

        def whole() -> openai.APIStatusError:
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(**long_request("cut-whole"))
            return refused.value

        def streamed() -> tuple[list[str], openai.APIError]:
            events = []
            with pytest.raises(openai.APIError) as failed:
                for chunk in client.chat.completions.create(
                    **long_request("cut-stream"), stream=True
                ):
                    events.append(chunk.id)
            return events, failed.value

        answers = pool.submit(whole), pool.submit(streamed)
        deadline = time.monotonic() + 20
        while len(engine.arrivals) < 2:
            assert time.monotonic() < deadline, "the requests never reached the engine"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        refusal = answers[0].result()
        events, failure = answers[1].result()
        ended = time.monotonic() - stopped
        assert proc.wait(timeout=30) == 0

    assert 2.5 < ended < 5, "ended at the grace, not at once nor by the kill"
    assert refusal.status_code == 503 and refusal.code == "server_stopping"
    assert refusal.response.headers["retry-after"] == "5"
    assert events == [] and "stopping" in failure.message  # an error event, not a cut
    assert sorted(engine.abandoned) == ["cut-stream", "cut-whole"]  # the engine was told
    rows = stack.query(
        "SELECT stream, outcome, status, error FROM llama_requests WHERE username = $1"
        " ORDER BY stream",
        "shutdown-cut-off",
    )
    assert [(row["stream"], row["outcome"], row["status"]) for row in rows] == [
        (False, "error", 503),
        (True, "error", 200),
    ]
    assert all("stopping" in row["error"] for row in rows)


def long_request(tag: str) -> dict[str, Any]:
    request = mock_request(tag, delay=30)
    return {
        "model": request["model"],
        "messages": request["messages"],
        "extra_body": {"mock_delay": request["mock_delay"]},
    }
