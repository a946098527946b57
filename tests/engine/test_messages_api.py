"""Anthropic's Messages API on both engines, with the real model and the official SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import Engine

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def anthropic_client(base_url: str, api_key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)


@pytest.fixture
def client(engine: Engine) -> Iterator[anthropic.Anthropic]:
    with anthropic_client(engine.base_url, engine.api_key) as client:
        yield client


def test_create_returns_text_usage_and_stop_reason(
    engine: Engine, client: anthropic.Anthropic
) -> None:
    message = client.messages.create(
        model=engine.model,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "The capital of France is"}],
        max_tokens=12,
        extra_body={"temperature": 0},  # no longer an argument of the SDK's: still taken
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == engine.model
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12
    assert message.stop_reason in ("end_turn", "max_tokens")


def test_a_stream_returns_the_same_text_and_final_usage(
    engine: Engine, client: anthropic.Anthropic
) -> None:
    asked = {"model": engine.model, "max_tokens": 16, "extra_body": {"temperature": 0},
             "messages": [{"role": "user", "content": "Once upon a time"}]}  # fmt: skip
    whole = client.messages.create(**asked)  # type: ignore[call-overload]
    with client.messages.stream(**asked) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.usage.input_tokens == whole.usage.input_tokens > 0
    assert final.usage.output_tokens == whole.usage.output_tokens > 0
    assert final.stop_reason == whole.stop_reason


def test_max_tokens_stops_it(engine: Engine, client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=engine.model,
        messages=[{"role": "user", "content": "the the the the"}],
        max_tokens=3,
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_count_tokens_counts_the_prompt_as_create_does(
    engine: Engine, client: anthropic.Anthropic
) -> None:
    asked = {"model": engine.model, "system": "Be brief.",
             "messages": [{"role": "user", "content": "How many tokens is this?"}]}  # fmt: skip
    counted = client.messages.count_tokens(**asked)  # type: ignore[arg-type]
    created = client.messages.create(**asked, max_tokens=1)  # type: ignore[call-overload]
    assert counted.input_tokens == created.usage.input_tokens > 5


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_returns_a_tool_use_that_validates(
    engine: Engine, client: anthropic.Anthropic, stream: bool
) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "tool", "name": "get_weather"}
    asked = {"model": engine.model, "max_tokens": 40, "tools": [WEATHER], "tool_choice": forced,
             "messages": question, "extra_body": {"temperature": 0}}  # fmt: skip
    if stream:
        with client.messages.stream(**asked) as events:  # type: ignore[arg-type]
            message = events.get_final_message()
    else:
        message = client.messages.create(**asked)  # type: ignore[call-overload]
    [tool_use] = [block for block in message.content if block.type == "tool_use"]
    assert tool_use.name == "get_weather" and tool_use.id.startswith("toolu_")
    jsonschema.validate(tool_use.input, WEATHER["input_schema"])
    assert message.stop_reason == "tool_use"


def test_a_structured_output_validates(engine: Engine, client: anthropic.Anthropic) -> None:
    properties = {"age": {"type": "integer"}, "happy": {"type": "boolean"}}
    schema = {"type": "object", "properties": properties, "required": ["age", "happy"],
              "additionalProperties": False}  # fmt: skip
    message = client.messages.create(
        model=engine.model,
        max_tokens=40,
        messages=[{"role": "user", "content": "A person as JSON:"}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    jsonschema.validate(json.loads(message.content[0].text), schema)  # type: ignore[union-attr]


def test_a_tool_result_continues_the_conversation(
    engine: Engine, client: anthropic.Anthropic
) -> None:
    message = client.messages.create(
        model=engine.model,
        max_tokens=10,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}]},
        ],
    )  # fmt: skip
    assert message.usage.input_tokens > 20


def test_a_wrong_key_is_anthropics_authentication_error(engine: Engine) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    with (
        anthropic_client(engine.base_url, "nope") as client,
        pytest.raises(anthropic.AuthenticationError) as refused,
    ):
        client.messages.create(model=engine.model, max_tokens=5, messages=hi)  # type: ignore[arg-type]
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }


def test_the_key_is_taken_as_x_api_key_or_bearer(engine: Engine) -> None:
    body = {"model": engine.model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    for headers in ({"x-api-key": engine.api_key}, {"Authorization": f"Bearer {engine.api_key}"}):
        answer = httpx.post(
            f"{engine.base_url}/v1/messages", json=body, headers=headers, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["type"] == "message"


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "invalid_request_error"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "model": "claude-x"},
         404, "not_found_error"),
        ({"max_tokens": 5, "messages": "Hi"}, 400, "invalid_request_error"),
    ],
)  # fmt: skip
def test_errors_are_in_anthropics_envelope(
    engine: Engine, body: dict[str, object], status: int, kind: str
) -> None:
    answer = httpx.post(
        f"{engine.base_url}/v1/messages",
        json={"model": engine.model, **body},
        headers={"x-api-key": engine.api_key},
        timeout=60,
    )
    assert answer.status_code == status
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert set(error["error"]) == {"type", "message"} and error["error"]["message"]
