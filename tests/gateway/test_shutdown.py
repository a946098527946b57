"""Stopping the gateway (SIGTERM, as `console.sh stop` does) lets the requests in flight
finish: their answers are whole and their rows are written. Through a real gateway and
database, with a fake engine that takes its time (it is the subject)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

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
