"""Every request that reached an engine has its tokens counted, however it ended: a client
that leaves mid-stream or before a whole answer gets a row with the engine's own count
of what it processed and generated up to the cut (`engine/tally.py`), on both engines."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from llamaserve.engine import tally
from tests.conftest import raw_post
from tests.engine.test_launcher import wait_until
from tests.gateway.conftest import Stack

LONG = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Write a long list of fruits."}]


def leave_after(stack: Stack, key: str, path: str, body: dict[str, object], tokens: int) -> str:
    """Stream a request, leave after `tokens` events with text; its request id."""
    with httpx.stream(
        "POST", f"{stack.gateway_url}{path}", json={**body, "stream": True},
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    ) as response:  # fmt: skip
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {") and _has_text(json.loads(line[6:])):
                seen += 1
                if seen == tokens:
                    break
        return response.headers["x-request-id"]


def _has_text(chunk: dict[str, object]) -> bool:
    choices = chunk.get("choices") or []
    for choice in choices:  # type: ignore[union-attr]
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return chunk.get("type") in ("response.output_text.delta", "content_block_delta")


def test_clients_that_leave_mid_stream_are_charged_what_the_engine_generated(
    stack: Stack, alice: str
) -> None:
    body = {"model": stack.model, "messages": CHAT, **LONG}
    for n in range(1, 21):
        request_id = leave_after(stack, alice, "/v1/chat/completions", body, n)
        row = stack.row(request_id)
        assert row["outcome"] == "cancelled"
        assert row["completion_tokens"] is not None and row["completion_tokens"] >= n, (n, row)
        assert row["prompt_tokens"] is not None and row["prompt_tokens"] > 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"input": "Write a long list of fruits.", "max_output_tokens": 2000}),
        ("/v1/messages", {"messages": CHAT, "max_tokens": 2000}),
    ],
)
def test_the_other_apis_cut_mid_stream_are_counted(
    stack: Stack, alice: str, path: str, body: dict[str, object]
) -> None:
    payload = {"model": stack.model, **body, "temperature": 0, "ignore_eos": True}
    request_id = leave_after(stack, alice, path, payload, 5)
    row = stack.row(request_id)
    assert row["outcome"] == "cancelled" and row["completion_tokens"] >= 5
    assert row["prompt_tokens"] > 0


def test_a_whole_answer_left_while_generating_is_counted(stack: Stack, alice: str) -> None:
    payload = {"model": stack.model, "prompt": "the the the the", **LONG}
    with raw_post(stack.gateway_url, alice, "/v1/completions", payload):
        # Generating, nothing sent to the client yet: 2,000 tokens take the engine far
        # longer than this, and a busy machine may take a second to start the first.
        time.sleep(3.0)
    rows = []

    def logged() -> bool:
        rows[:] = stack.query(
            "SELECT * FROM llama_requests WHERE key_id = $1 AND outcome = 'cancelled'",
            alice.split("_")[1],
        )
        return bool(rows)

    wait_until(logged, timeout=10.0)
    [row] = rows
    assert row["completion_tokens"] is not None and row["completion_tokens"] > 0
    assert row["prompt_tokens"] > 0
    # The engine stopped generating when the client went away, far short of the 2,000
    # tokens asked, and the row has all it generated. llama-cpp-python went on to the end
    # (80 s on a slow machine, busy for no one), its row short of what it generated.
    counted = httpx.get(
        f"{stack.engine_url}{tally.PREFIX}{row['request_id']}",
        headers={"Authorization": f"Bearer {stack.engine_key}"},
    ).json()
    assert counted["ended"] and counted["completion_tokens"] == row["completion_tokens"]
    assert row["completion_tokens"] < LONG["max_tokens"]


@pytest.mark.one_engine
def test_tallies_are_the_gateways_to_read(stack: Stack, alice: str) -> None:
    """Read on the engine with its key only; never through the gateway."""
    url = f"{stack.engine_url}/llamaserve/tally/0123abcd"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {alice}"}).status_code == 401
    unknown = httpx.get(url, headers={"Authorization": f"Bearer {stack.engine_key}"})
    assert unknown.status_code == 404
    through = httpx.get(f"{stack.gateway_url}/llamaserve/tally/0123abcd",
                        headers={"Authorization": f"Bearer {alice}"})  # fmt: skip
    assert through.status_code == 404 and through.json()["error"]["code"] == "unknown_url"
