"""A client that leaves through the gateway frees the engine's slot, as the engine's own
slot state shows (llama-server's /slots; llama-cpp-python has one slot and no /slots)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import raw_post
from tests.engine.test_launcher import ENDLESS as ENDLESS_PROMPT
from tests.engine.test_launcher import generating, wait_until
from tests.gateway.conftest import Stack

ENDLESS = {**ENDLESS_PROMPT, "ignore_eos": True}


def busy_slots(stack: Stack) -> int:
    return generating(stack.project, stack.engine_key)


@pytest.fixture
def llama_server(stack: Stack) -> Stack:
    if stack.engine != "llama-server":
        pytest.skip("llama-cpp-python has no slot state to read (test_request_log covers it)")
    return stack


@pytest.mark.one_engine
def test_a_stream_left_through_the_gateway_frees_the_slot(llama_server: Stack, alice: str) -> None:
    body = {"model": llama_server.model, **ENDLESS, "stream": True}
    with httpx.stream(
        "POST", f"{llama_server.gateway_url}/v1/completions", json=body,
        headers={"Authorization": f"Bearer {alice}"}, timeout=60,
    ) as response:  # fmt: skip
        lines = response.iter_lines()  # kept: dropping it would close the stream
        assert next(lines).startswith("data: {")
        wait_until(lambda: busy_slots(llama_server) == 1, timeout=5.0)
    assert wait_until(lambda: busy_slots(llama_server) == 0, timeout=1.0) < 1.0


@pytest.mark.one_engine
def test_a_plain_request_left_through_the_gateway_frees_the_slot(
    llama_server: Stack, alice: str
) -> None:
    payload = {"model": llama_server.model, **ENDLESS}
    with raw_post(llama_server.gateway_url, alice, "/v1/completions", payload):
        wait_until(lambda: busy_slots(llama_server) == 1, timeout=30.0)
        time.sleep(0.3)  # generating, nothing sent to the client yet
    assert wait_until(lambda: busy_slots(llama_server) == 0, timeout=1.0) < 1.0
