"""OpenAI's Responses API on both engines, with the real model and the official SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.conftest import ENVELOPE, Engine

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def client(engine: Engine) -> Iterator[OpenAI]:
    with engine.client() as client:
        yield client


def test_create_returns_text_and_usage(engine: Engine, client: OpenAI) -> None:
    response = client.responses.create(
        model=engine.model,
        instructions="Answer briefly.",
        input="The capital of France is",
        max_output_tokens=12,
        temperature=0,
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == engine.model
    assert response.output_text
    assert response.usage is not None
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 12
    total = response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.total_tokens == total
    assert response.store is False  # the engine alone keeps nothing


def test_a_stream_returns_the_same_text_and_its_usage(engine: Engine, client: OpenAI) -> None:
    asked = {"model": engine.model, "input": "Once upon a time", "max_output_tokens": 16,
             "temperature": 0}  # fmt: skip
    whole = client.responses.create(**asked)  # type: ignore[call-overload]
    deltas, ends = [], []
    with client.responses.stream(**asked) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type in ("response.completed", "response.incomplete"):
                ends.append(event.response)  # incomplete: cut at max_output_tokens
    [final] = ends
    assert final.status == whole.status
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage is not None and whole.usage is not None
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_cut_answer_says_so(engine: Engine, client: OpenAI) -> None:
    response = client.responses.create(
        model=engine.model, input="the the the the", max_output_tokens=3, temperature=0
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3


def test_a_json_schema_output_validates(engine: Engine, client: OpenAI) -> None:
    response = client.responses.create(
        model=engine.model,
        input="Describe a person as JSON.",
        text={
            "format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
        },
        max_output_tokens=60,
        temperature=0,
    )
    jsonschema.validate(json.loads(response.output_text), SCHEMA)


def test_a_json_object_output_is_an_object(engine: Engine, client: OpenAI) -> None:
    """As the chat test of json_object (test_openai_api.py), with llama.cpp's repetition
    penalty passed through: one of a few penalties must give a whole object."""
    for penalty in (1.4, 1.3, 1.5, 1.6):
        response = client.responses.create(
            model=engine.model,
            input="Reply with a JSON object.",
            text={"format": {"type": "json_object"}},
            max_output_tokens=300,
            temperature=0,
            extra_body={"repeat_penalty": penalty},
        )
        assert response.output_text.lstrip().startswith("{"), (penalty, response.output_text)
        if response.status == "completed":
            assert isinstance(json.loads(response.output_text), dict)
            return
    raise AssertionError("no penalty gave a whole JSON object")


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_has_arguments_that_validate(
    engine: Engine, client: OpenAI, stream: bool
) -> None:
    asked = {"model": engine.model, "input": "What is the weather in Paris?", "tools": [WEATHER],
             "tool_choice": {"type": "function", "name": "get_weather"},
             "max_output_tokens": 40, "temperature": 0}  # fmt: skip
    if stream:
        with client.responses.stream(**asked) as events:  # type: ignore[arg-type]
            response = events.get_final_response()
    else:
        response = client.responses.create(**asked)  # type: ignore[call-overload]
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_a_function_result_continues_the_conversation(engine: Engine, client: OpenAI) -> None:
    response = client.responses.create(
        model=engine.model,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=10,
        temperature=0,
    )  # fmt: skip
    assert response.usage is not None and response.usage.input_tokens > 20


def test_an_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.create(model="gpt-4o", input="Hi", max_output_tokens=5)
    assert refused.value.code == "model_not_found"


def test_bad_input_is_400_naming_the_parameter(engine: Engine, client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model=engine.model,
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],  # type: ignore[list-item]
        )
    body = refused.value.body
    assert isinstance(body, dict) and set(body) == ENVELOPE
    assert body["param"] == "input.0.content.0"


def test_stored_responses_are_the_gateways(engine: Engine, client: OpenAI) -> None:
    """The engine alone keeps nothing: continuing or reading a response names the gateway."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=engine.model, input="Hi", previous_response_id="resp_1")
    assert refused.value.param == "previous_response_id" and "gateway" in refused.value.message
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as missing:
            call("resp_1")
        assert "gateway" in missing.value.message


def test_a_wrong_key_is_401(engine: Engine) -> None:
    answer = httpx.post(
        f"{engine.base_url}/v1/responses",
        json={"model": engine.model, "input": "Hi"},
        headers={"Authorization": "Bearer nope"},
    )
    assert answer.status_code == 401 and set(answer.json()["error"]) == ENVELOPE
