"""The Responses and Messages APIs through the gateway, with the real model and the official
SDKs: each request's llama_requests row has the engine's exact tokens, streamed or not;
stored responses continue a conversation and are each user's own; a client that leaves
frees its slot and its row says so. Rate limits and queues: test_api_routes.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.engine.test_launcher import wait_until
from tests.gateway.conftest import Stack
from tests.gateway.test_cancellation import busy_slots
from tests.gateway.test_cancellation import llama_server as llama_server  # a fixture

HELLO = [{"role": "user", "content": "Write a list of fruits."}]


@pytest.fixture
def claude(stack: Stack, alice: str) -> Iterator[anthropic.Anthropic]:
    """An Anthropic client of the gateway, with alice's key (sent as `x-api-key`)."""
    with anthropic.Anthropic(
        base_url=stack.gateway_url, api_key=alice, max_retries=0, timeout=300
    ) as client:
        yield client


def events(stack: Stack, key: str, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    """A streamed request's id and the data of its events."""
    with httpx.stream(
        "POST", f"{stack.gateway_url}{path}", json={**body, "stream": True},
        headers={"x-api-key": key}, timeout=300,
    ) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        data = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        return response.headers["x-request-id"], data


def tokens(row: Any) -> tuple[int, int]:
    return row["prompt_tokens"], row["completion_tokens"]


def test_responses_rows_have_the_engines_exact_tokens(stack: Stack, alice: str) -> None:
    asked = {"model": stack.model, "input": "Write a list of fruits.", "max_output_tokens": 12,
             "temperature": 0}  # fmt: skip
    raw = stack.client(alice).responses.with_raw_response.create(**asked)  # type: ignore[call-overload]
    usage = raw.parse().usage
    row = stack.row(raw.headers["x-request-id"])
    assert tokens(row) == (usage.input_tokens, usage.output_tokens)
    assert (row["path"], row["stream"], row["outcome"]) == ("/v1/responses", False, "ok")
    request_id, data = events(stack, alice, "/v1/responses", asked)
    last = data[-1]
    assert last["type"] in ("response.completed", "response.incomplete")
    row = stack.row(request_id)
    assert tokens(row) == (last["response"]["usage"]["input_tokens"],
                           last["response"]["usage"]["output_tokens"]) == tokens(row)  # fmt: skip
    assert tokens(row) == (usage.input_tokens, usage.output_tokens)
    assert row["stream"] is True and row["outcome"] == "ok" and row["ttft_ms"] is not None


def test_messages_rows_have_the_engines_exact_tokens(
    stack: Stack, alice: str, claude: anthropic.Anthropic
) -> None:
    asked = {"model": stack.model, "max_tokens": 12, "messages": HELLO}
    raw = claude.messages.with_raw_response.create(**asked)  # type: ignore[call-overload]
    message = raw.parse()
    row = stack.row(raw.headers["x-request-id"])
    assert tokens(row) == (message.usage.input_tokens, message.usage.output_tokens)
    assert (row["path"], row["stream"], row["outcome"]) == ("/v1/messages", False, "ok")
    with claude.messages.stream(**asked) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    row = stack.row(request_id)
    assert tokens(row) == (final.usage.input_tokens, final.usage.output_tokens)
    assert row["stream"] is True and row["outcome"] == "ok"


def test_count_tokens_through_the_gateway(stack: Stack, claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=stack.model, messages=HELLO)  # type: ignore[arg-type]
    created = claude.messages.create(model=stack.model, max_tokens=1, messages=HELLO)  # type: ignore[arg-type]
    assert counted.input_tokens == created.usage.input_tokens > 0


def test_x_api_key_and_bearer_both_authenticate(stack: Stack, alice: str) -> None:
    body = {"model": stack.model, "max_tokens": 2, "messages": HELLO}
    for headers in ({"x-api-key": alice}, {"Authorization": f"Bearer {alice}"}):
        answer = httpx.post(f"{stack.gateway_url}/v1/messages", json=body, headers=headers,
                            timeout=300)  # fmt: skip
        assert answer.status_code == 200 and answer.json()["type"] == "message"


def test_a_wrong_key_is_anthropics_authentication_error(stack: Stack) -> None:
    with (
        anthropic.Anthropic(base_url=stack.gateway_url, api_key="lsk_nope", max_retries=0) as c,
        pytest.raises(anthropic.AuthenticationError) as refused,
    ):
        c.messages.create(model=stack.model, max_tokens=2, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }


def test_a_stored_response_continues_is_read_and_deleted(stack: Stack, alice: str) -> None:
    client = stack.client(alice)
    first = client.responses.create(model=stack.model, input="My name is Ada.",
                                    max_output_tokens=8, temperature=0)  # fmt: skip
    assert first.store is True and first.usage is not None
    second = client.responses.create(model=stack.model, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=8,
                                     temperature=0)  # fmt: skip
    assert second.previous_response_id == first.id and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # The same conversation sent whole, unstored: the same prompt, token for token.
    whole = client.responses.create(
        model=stack.model, store=False, max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": "My name is Ada."},
               {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "What is my name?"}],
    )  # fmt: skip
    assert whole.usage is not None and whole.usage.input_tokens == second.usage.input_tokens
    assert whole.output_text == second.output_text and whole.store is False
    # Read back, another user's 404, deleted.
    assert client.responses.retrieve(first.id).output_text == first.output_text
    bob = stack.client(stack.create_user("bob" + alice[-8:].lower().replace("_", "")))
    for call in (lambda: bob.responses.retrieve(first.id), lambda: bob.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model=stack.model, input="Hi", previous_response_id=first.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert client.responses.retrieve(second.id).id == second.id


# A city from a list: short whatever the sampling, so that no answer is cut at max_tokens.
CITY = {"type": "string", "enum": ["Paris", "London", "Rome"]}
WEATHER = {"type": "object", "properties": {"city": CITY}, "required": ["city"]}


def test_forced_calls_and_formats_through_the_gateway(
    stack: Stack, alice: str, claude: anthropic.Anthropic
) -> None:
    question = "What is the weather in Paris?"
    response = stack.client(alice).responses.create(
        model=stack.model, input=question, max_output_tokens=40, temperature=0,
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}],
        tool_choice={"type": "function", "name": "get_weather"},
    )  # fmt: skip
    [call] = [item for item in response.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    message = claude.messages.create(
        model=stack.model, max_tokens=40, messages=[{"role": "user", "content": question}],
        extra_body={"temperature": 0},
        tools=[{"name": "get_weather", "input_schema": WEATHER}],
        tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    [tool_use] = [block for block in message.content if block.type == "tool_use"]
    jsonschema.validate(tool_use.input, WEATHER)
    formatted = stack.client(alice).responses.create(
        model=stack.model, input="A city as JSON.", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": WEATHER}},
    )  # fmt: skip
    jsonschema.validate(json.loads(formatted.output_text), WEATHER)


def test_stored_text_never_reaches_the_gateway_log(stack: Stack, alice: str) -> None:
    secret = "zebra-quartz-" + alice[-6:]
    client = stack.client(alice)
    first = client.responses.create(model=stack.model, input=secret, max_output_tokens=4)
    client.responses.create(model=stack.model, input="And?", previous_response_id=first.id,
                            max_output_tokens=4)  # fmt: skip
    client.responses.retrieve(first.id)
    log = (stack.project.runtime / "logs" / "gateway.log").read_text()
    assert "request id=" in log and "/v1/responses" in log
    assert secret not in log


def test_the_cli_shows_these_requests(
    stack: Stack, alice: str, claude: anthropic.Anthropic
) -> None:
    raw = claude.messages.with_raw_response.create(model=stack.model, max_tokens=2, messages=HELLO)  # type: ignore[arg-type]
    stack.client(alice).responses.create(model=stack.model, input="Hi", max_output_tokens=2)
    username = stack.row(raw.headers["x-request-id"])["username"]
    logs = stack.cli("logs", "--user", username, "--json")
    assert logs.returncode == 0, logs.stderr
    paths = [row["path"] for row in json.loads(logs.stdout)]
    assert "/v1/messages" in paths and "/v1/responses" in paths
    usage = stack.cli("usage", "--user", username, "--json")
    assert usage.returncode == 0, usage.stderr
    [mine] = json.loads(usage.stdout)
    assert mine["requests"] >= 2 and mine["prompt_tokens"] > 0


@pytest.mark.one_engine
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"max_tokens": 3000, "messages": [{"role": "user", "content": "the"}]}),
        ("/v1/responses", {"max_output_tokens": 3000, "input": "the the the the"}),
    ],
)  # fmt: skip
def test_a_client_gone_mid_stream_frees_its_slot_and_is_logged_cancelled(
    llama_server: Stack,
    alice: str,
    path: str,
    body: dict[str, Any],
) -> None:
    payload = {"model": llama_server.model, **body, "temperature": 0, "ignore_eos": True,
               "stream": True}  # fmt: skip
    with httpx.stream(
        "POST", f"{llama_server.gateway_url}{path}", json=payload,
        headers={"x-api-key": alice}, timeout=60,
    ) as response:  # fmt: skip
        lines = response.iter_lines()  # kept: dropping it would close the stream
        while "delta" not in next(lines):
            pass
        request_id = response.headers["x-request-id"]
        wait_until(lambda: busy_slots(llama_server) == 1, timeout=5.0)
    assert wait_until(lambda: busy_slots(llama_server) == 0, timeout=1.0) < 1.0
    row = llama_server.row(request_id)
    assert row["outcome"] == "cancelled" and row["path"] == path
