"""The Responses and Messages APIs over chat completions, without a model: what a request
becomes, what a chat stream is written as, and what is refused. The real model, through
both engines and the gateway, with the official SDKs: test_responses_api.py,
test_messages_api.py and tests/gateway/test_apis.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.types import Message
from openai.types.responses import Response

from llamaserve.engine import messages_api, responses_api
from llamaserve.errors import InvalidRequest


def chat_stream(
    text: list[str], *, finish: str = "stop", calls: Any = None
) -> list[dict[str, Any]]:
    """The chunks a chat stream is made of, as the engines' fronts send them."""
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"content": t}}]} for t in text
    ]
    for call in calls or ():
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    return chunks


def written(writer: Any, chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    events = writer.start()
    for chunk in chunks:
        events += writer.chunk(chunk)
    return events + writer.finish()


REQUEST = {"model": "m", "input": "Hi"}


def test_a_responses_request_becomes_chat() -> None:
    chat = responses_api.to_chat(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "What is 2+2?"}]},
                {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "4"},
            ],
            "max_output_tokens": 9,
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
            "tools": [{"type": "function", "name": "add", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "add"},
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]  # fmt: skip
    assert chat["max_tokens"] == 9 and chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert chat["tools"][0]["function"]["name"] == "add"
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "add"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.0.content.0"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "stream": "yes"}, "stream"),
        ({}, "input"),
    ],
)  # fmt: skip
def test_what_the_engines_cannot_do_is_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        responses_api.check_responses({"model": "m", **body})
    assert refused.value.param == param


def test_a_chat_stream_is_written_as_the_responses_stream() -> None:
    writer = responses_api.ResponseWriter(REQUEST)
    events = written(writer, chat_stream(["Hel", "lo"]))
    names = [name for name, _ in events]
    assert names == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(data["type"] == name for name, data in events)
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert all(d["output_index"] == 0 and d["content_index"] == 0 for d in deltas)
    # The whole response, as the SDK reads it.
    response = Response.model_validate(events[-1][1]["response"])
    assert response.output_text == "Hello" and response.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 3)
    assert response.usage.total_tokens == 10 and response.store is False


def test_a_cut_answer_is_incomplete() -> None:
    writer = responses_api.ResponseWriter(REQUEST)
    events = written(writer, chat_stream(["Hel"], finish="length"))
    assert events[-1][0] == "response.incomplete"
    response = Response.model_validate(writer.response())
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def test_a_call_is_a_function_call_item() -> None:
    writer = responses_api.ResponseWriter(REQUEST)
    call = {"index": 0, "id": "call_1", "function": {"name": "add", "arguments": '{"a": 1'}}
    more = {"index": 0, "function": {"arguments": "}"}}
    events = written(writer, chat_stream([], finish="tool_calls", calls=[call, more]))
    names = [name for name, _ in events]
    assert names[2:] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    [item] = Response.model_validate(writer.response()).output
    assert item.type == "function_call" and item.call_id == "call_1" and item.name == "add"
    assert json.loads(item.arguments) == {"a": 1}


def test_a_messages_request_becomes_chat() -> None:
    chat = messages_api.to_chat(
        {
            "model": "m",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "3"},
                    {"type": "text", "text": "Thanks."}]},
            ],
            "stop_sequences": ["\n"],
            "top_k": 4,
            "tools": [{"name": "add", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        }
    )  # fmt: skip
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 1 and 2."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "3"},
        {"role": "user", "content": "Thanks."},
    ]  # fmt: skip
    assert (chat["max_tokens"], chat["stop"], chat["top_k"]) == (5, ["\n"], 4)
    assert chat["tool_choice"] == "required"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"max_tokens": 5, "messages": []}, "messages"),
        ({"max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]},
         "temperature"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {}}]}]}, "messages.0.content.0.type"),
    ],
)  # fmt: skip
def test_a_messages_request_the_engines_cannot_run_is_refused(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        messages_api.check_messages({"model": "m", **body})
    assert refused.value.param == param


def test_a_chat_stream_is_written_as_the_messages_stream() -> None:
    writer = messages_api.MessageWriter({"model": "m"})
    call = {"index": 0, "id": "call_9", "function": {"name": "add", "arguments": '{"a": 1}'}}
    events = written(writer, chat_stream(["Hi"], finish="tool_calls", calls=[call]))
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop",
    ]  # fmt: skip
    assert [data.get("index") for _, data in events[1:7]] == [0, 0, 0, 1, 1, 1]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"input_tokens": 7, "output_tokens": 3}
    message = Message.model_validate(writer.message())
    text, tool_use = message.content
    assert text.type == "text" and text.text == "Hi"
    assert tool_use.type == "tool_use" and tool_use.input == {"a": 1}
    assert tool_use.id == "toolu_9" and message.stop_reason == "tool_use"


@pytest.mark.parametrize(("finish", "reason"), [("stop", "end_turn"), ("length", "max_tokens")])
def test_the_stop_reason_is_anthropics(finish: str, reason: str) -> None:
    writer = messages_api.MessageWriter({"model": "m"})
    written(writer, chat_stream(["x"], finish=finish))
    assert writer.message()["stop_reason"] == reason


def test_tool_choice_auto_without_tools_is_openais_default() -> None:
    """As OpenAI echoes it (`tool_choice` 'auto', `tools` []): no call, no refusal."""
    for choice in ("auto", "none"):
        chat = responses_api.to_chat({"model": "m", "input": "Hi", "tool_choice": choice})
        assert "tool_choice" not in chat and "tools" not in chat
    forced = responses_api.to_chat(
        {"model": "m", "input": "Hi", "tool_choice": {"type": "function", "name": "f"}}
    )
    assert forced["tool_choice"] == {"type": "function", "function": {"name": "f"}}
