"""Exact usage in llama_requests, for plain and streamed requests, and cancelled ones
(the stack's); the rows a stopping gateway still holds (a site's)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.gateway.conftest import Stack
from tests.gateway.harness import Site
from tests.gateway.helpers import extra_gateway

CHAT = [{"role": "user", "content": "Write a list of fruits."}]


def test_plain_request_row_matches_the_engine_usage(stack: Stack, alice: str) -> None:
    raw = stack.client(alice).chat.completions.with_raw_response.create(
        model=stack.model, messages=CHAT, max_tokens=12, temperature=0
    )
    usage = raw.parse().usage
    row = stack.row(raw.headers["x-request-id"])
    assert usage is not None
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row["status"] == 200 and row["outcome"] == "ok" and row["stream"] is False
    assert row["model"] == stack.model and row["path"] == "/v1/chat/completions"
    assert row["bytes_in"] > 0 and row["bytes_out"] == len(raw.content)
    assert row["latency_ms"] > 0 and row["client_addr"] == "127.0.0.1"
    assert row["key_id"] == alice.split("_")[1] and row["engine"] == stack.engine_url


@pytest.mark.one_engine
def test_the_client_address_is_the_connections_not_what_a_header_claims(
    stack: Stack, alice: str
) -> None:
    raw = stack.client(alice).chat.completions.with_raw_response.create(
        model=stack.model, messages=CHAT, max_tokens=1,
        extra_headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
    )  # fmt: skip
    assert stack.row(raw.headers["x-request-id"])["client_addr"] == "127.0.0.1"
    assert "server" not in raw.headers  # the gateway does not name its HTTP server


def test_the_engines_own_refusals_are_logged_as_rejected(stack: Stack, alice: str) -> None:
    client = stack.client(alice)
    with pytest.raises(openai.NotFoundError) as unknown:  # the engine's 404, passed through
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as invalid:  # the engine's 400
        client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=-5)
    for refused, status in ((unknown.value, 404), (invalid.value, 400)):
        row = stack.row(refused.response.headers["x-request-id"])
        assert (row["status"], row["outcome"]) == (status, "rejected")
        assert row["error"]


def test_streamed_request_row_counts_tokens_not_shown_to_the_client(
    stack: Stack, alice: str
) -> None:
    body = {"model": stack.model, "messages": CHAT, "max_tokens": 12, "temperature": 0}
    headers = {"Authorization": f"Bearer {alice}"}
    with httpx.stream(
        "POST", f"{stack.gateway_url}/v1/chat/completions", json={**body, "stream": True},
        headers=headers, timeout=300,
    ) as response:  # fmt: skip
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
        request_id = response.headers["x-request-id"]
        sent = response.num_bytes_downloaded
    chunks = [json.loads(e[6:]) for e in events if e != "data: [DONE]"]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # not asked for
    plain = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions", json=body, headers=headers, timeout=300
    ).json()["usage"]
    row = stack.row(request_id)
    assert row["stream"] is True and row["outcome"] == "ok"
    assert row["prompt_tokens"] == plain["prompt_tokens"]
    assert row["completion_tokens"] == plain["completion_tokens"] == 12
    assert row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["latency_ms"]
    assert row["bytes_out"] == sent


def test_client_gone_mid_stream_leaves_a_cancelled_row(stack: Stack, alice: str) -> None:
    body = {"model": stack.model, "messages": CHAT, "max_tokens": 2000, "stream": True}
    with httpx.stream(
        "POST", f"{stack.gateway_url}/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {alice}"}, timeout=300,
    ) as response:  # fmt: skip
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        request_id = response.headers["x-request-id"]
    # Leaving the block closed the connection mid-stream.
    row = stack.row(request_id)
    assert row["outcome"] == "cancelled" and row["status"] == 200
    assert row["latency_ms"] < 60_000
    # The engine stopped generating: the next request is answered promptly.
    began = time.monotonic()
    stack.client(alice).chat.completions.create(model=stack.model, messages=CHAT, max_tokens=1)
    assert time.monotonic() - began < 30


def test_rows_still_buffered_are_written_when_the_gateway_stops(site: Site) -> None:
    headers = {"Authorization": f"Bearer {site.create_user('alice-log')}"}
    with extra_gateway(site) as url:
        ids = [httpx.get(f"{url}/v1/models", headers=headers).headers["x-request-id"]
               for _ in range(20)]  # fmt: skip
    # The gateway was stopped (SIGTERM) right after the last answer, within its batch interval.
    found = site.query("SELECT request_id FROM llama_requests WHERE request_id = ANY($1)", ids)
    assert {r["request_id"] for r in found} == set(ids)
