"""The checks every route applies to a generation request before an engine runs it (the
gateway's and both engines' fronts call the same ones): `max_tokens` is the one bound on
what is generated, a model is named, and what the engines cannot render is a 400."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamaserve.engine.protocol import check_request, parse_request
from llamaserve.errors import APIError, InvalidRequest, NotFound

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def checked(path: str = CHAT, **body: Any) -> tuple[dict[str, Any], bool]:
    return check_request(path, json.dumps({"model": "m", **body}).encode())


def refusal(path: str = CHAT, **body: Any) -> APIError:
    with pytest.raises(APIError) as refused:
        check_request(path, json.dumps(body).encode())
    return refused.value


@pytest.mark.parametrize(
    ("lengths", "bound"),
    [
        ({"max_tokens": 4, "n_predict": 64}, 4),
        ({"max_tokens": 4, "n_predict": -1}, 4),
        ({"n_predict": 64, "max_tokens": 100}, 64),
        ({"n_predict": 7}, 7),
        ({"max_completion_tokens": 5}, 5),
        ({"max_completion_tokens": 9, "max_tokens": 3, "n_predict": 6}, 3),
    ],
)
def test_llama_cpps_other_names_for_max_tokens_are_folded_into_it(
    lengths: dict[str, int], bound: int
) -> None:
    body, changed = checked(messages=MESSAGES, **lengths)
    assert changed
    assert body["max_tokens"] == bound
    assert "n_predict" not in body and "max_completion_tokens" not in body


def test_unbounded_aliases_leave_max_tokens_as_the_client_set_it() -> None:
    body, changed = checked(messages=MESSAGES, n_predict=-1, max_completion_tokens=None)
    assert changed and "max_tokens" not in body and "n_predict" not in body
    body, changed = checked(messages=MESSAGES, max_tokens=8)
    assert not changed and body["max_tokens"] == 8


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("n_predict", "64", "Invalid type for 'n_predict'"),
        ("n_predict", 0, "Invalid value for 'n_predict'"),
        ("max_completion_tokens", -5, "Invalid value for 'max_completion_tokens'"),
        ("n_cmpl", 4, "Only n=1"),
        ("n", 2, "Only n=1"),
    ],
)
def test_a_bound_that_is_no_bound_is_refused(field: str, value: object, words: str) -> None:
    error = refusal(model="m", messages=MESSAGES, **{field: value})
    assert isinstance(error, InvalidRequest) and words in error.message
    assert error.param == field


def test_a_request_without_a_model_is_refused_as_openai_refuses_it() -> None:
    error = refusal(messages=MESSAGES)
    assert (error.status, error.param) == (400, "model")
    assert "must provide a model" in error.message
    assert refusal(model=3, messages=MESSAGES).param == "model"
    with pytest.raises(InvalidRequest, match="must provide a model"):
        parse_request(b"", "served")


def test_stream_options_are_checked_on_every_route() -> None:
    error = refusal(model="m", messages=MESSAGES, stream=True,
                    stream_options={"include_usage": "yes"})  # fmt: skip
    assert error.param == "stream_options.include_usage"


def test_a_tool_call_of_another_type_in_the_history_is_a_400() -> None:
    call = {"id": "c1", "type": "custom", "custom": {"name": "f", "input": "x"}}
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    error = refusal(model="m", messages=history)
    assert (error.status, error.code) == (400, "unsupported_tool_call_type")
    assert error.param == "messages.1.tool_calls.0.type"
    function = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history[1]["tool_calls"] = [function]
    assert checked(messages=history)[0]["messages"][1]["tool_calls"] == [function]


def test_the_engines_name_another_model_not_found() -> None:
    body = json.dumps({"model": "other", "messages": MESSAGES}).encode()
    with pytest.raises(NotFound):
        parse_request(body, "served")
    assert parse_request(body.replace(b"other", b"served"), "served")["model"] == "served"


def test_max_tokens_0_reads_back_a_completions_prompt_and_is_refused_otherwise() -> None:
    """OpenAI's read-back of a prompt (`echo`, nothing generated); any other 0 would
    generate without end on both engines."""
    prompt = {"prompt": "Hi", "echo": True}
    assert checked(COMPLETIONS, max_tokens=0, **prompt)[0]["max_tokens"] == 0
    assert checked(COMPLETIONS, max_tokens=0, n_predict=9, **prompt)[0]["max_tokens"] == 0
    for body, param in [
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 0, "echo": False}, "max_tokens"),
        ({"max_tokens": -1, **prompt}, "max_tokens"),
        ({"max_tokens": 0, "logprobs": 0, **prompt}, "logprobs"),  # no engine gives the prompt's
        ({"max_completion_tokens": 0, **prompt}, "max_completion_tokens"),
        ({"n_predict": 0, **prompt}, "n_predict"),
        ({"messages": MESSAGES, "max_tokens": 0, "echo": True}, "max_tokens"),
    ]:
        path = CHAT if "messages" in body else COMPLETIONS
        error = refusal(path, model="m", **body)
        assert (error.status, error.param) == (400, param), body


def test_a_parameter_given_as_null_is_not_given() -> None:
    body, changed = checked(messages=MESSAGES, frequency_penalty=None, presence_penalty=None,
                            stop=None)  # fmt: skip
    assert changed and set(body) == {"model", "messages"}
    assert refusal(model=None, messages=MESSAGES).param == "model"


def test_a_message_without_content_is_refused_unless_it_calls_a_tool() -> None:
    for message in ({"role": "assistant"}, {"role": "user", "content": None}):
        error = refusal(model="m", messages=[*MESSAGES, message])
        assert (error.status, error.param) == (400, "messages.1.content")
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    calling = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert checked(messages=[*MESSAGES, calling])[0]["messages"][1] == calling


@pytest.mark.parametrize("call_id", [None, 4, "absent"])
def test_a_tool_message_needs_its_call_id(call_id: Any) -> None:
    """llama-server failed on a tool message whose tool_call_id was null (a 500)."""
    message: dict[str, Any] = {"role": "tool", "content": "4"}
    if call_id != "absent":
        message["tool_call_id"] = call_id
    refused = refusal(model="m", messages=[*MESSAGES, message])
    assert refused.status == 400 and refused.param == "messages.1.tool_call_id"
