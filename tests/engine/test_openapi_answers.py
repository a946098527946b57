"""Both engines' answers against OpenAI's own OpenAPI description (tests/openapi.py):
chat, completions, models and the Responses API, whole, streamed and refused; and the
headers a fuzzing with it found missing: `Allow` on a 405, `x-request-id` on every
answer."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import ENVELOPE, Engine, default_model
from tests.engine.test_openai_api import CHAT, FORCED_RECORD, PERSON
from tests.openapi import OpenAPI, openapi

ANSWERS = {  # the request's own parameters, by case
    "text": {"messages": CHAT, "max_tokens": 4, "temperature": 0},
    "logprobs": {"messages": CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True,
                 "top_logprobs": 2},
    "tool call": FORCED_RECORD,
    "function call": {"messages": FORCED_RECORD["messages"], "max_tokens": 60, "temperature": 0,
                      "functions": [{"name": "record", "parameters": PERSON}],
                      "function_call": {"name": "record"}},
}  # fmt: skip
RESPONSES = {  # a Responses request's own parameters, by case
    "text": {"input": "Write a list of fruits.", "max_output_tokens": 4, "temperature": 0},
    "json schema": {"instructions": "Answer as JSON.", "input": "Jason is 30 years old.",
                    "text": {"format": {"type": "json_schema", "name": "person",
                                        "schema": PERSON}},
                    "max_output_tokens": 60, "temperature": 0, "metadata": {"case": "json"},
                    "user": "someone"},
    "function call": {"input": "Jason is 30 years old.", "max_output_tokens": 60,
                      "temperature": 0,
                      "tools": [{"type": "function", "name": "record", "parameters": PERSON}],
                      "tool_choice": {"type": "function", "name": "record"}},
}  # fmt: skip
REFUSED = {  # Responses requests an engine refuses, 400 in OpenAI's envelope
    "a temperature out of range": {"input": "Hi", "temperature": 5},
    "no input": {"instructions": "Hi"},
    "a web search": {"input": "Hi", "tools": [{"type": "web_search"}]},
    "an image": {"input": [{"role": "user", "content": [{"type": "input_image",
                                                          "image_url": "x"}]}]},
    "a stored response": {"input": "Hi", "previous_response_id": "resp_1"},
}  # fmt: skip
CLIENTS_ID = uuid.uuid4()


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    return openapi()


def post(engine: Engine, path: str, body: dict[str, Any]) -> httpx.Response:
    response = httpx.post(
        f"{engine.base_url}{path}",
        json={"model": engine.model, **body},
        headers={"Authorization": f"Bearer {engine.api_key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response


def named_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The events of a Responses stream, each named as its `type` says; no `[DONE]`."""
    found, name = [], None
    for line in response.text.splitlines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
            assert data["type"] == name, response.text
            found.append(data)
    assert [event["sequence_number"] for event in found] == list(range(len(found)))
    return found


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The chunks of a stream, which must end with `[DONE]`."""
    data = [
        line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert data[-1] == "[DONE]", response.text
    return [json.loads(chunk) for chunk in data[:-1]]


@pytest.mark.parametrize("case", list(ANSWERS))
def test_a_whole_chat_answer_is_openais(engine: Engine, spec: OpenAPI, case: str) -> None:
    """OpenAI requires `refusal` (null here) in the message and in a logprobs object;
    a token's entry has none."""
    whole = post(engine, "/v1/chat/completions", ANSWERS[case]).json()
    spec.check("CreateChatCompletionResponse", whole)
    [choice] = whole["choices"]
    assert choice["message"]["refusal"] is None
    if case == "logprobs":
        assert choice["logprobs"]["refusal"] is None and choice["logprobs"]["content"]


@pytest.mark.parametrize("case", list(ANSWERS))
def test_a_chat_stream_is_openais(engine: Engine, spec: OpenAPI, case: str) -> None:
    """OpenAI requires `refusal` (null here) in a chunk's logprobs object, not in its delta;
    a delta's `role`, `tool_calls` and `function_call` are never null (llama_cpp's were)."""
    chunks = events(post(engine, "/v1/chat/completions", {**ANSWERS[case], "stream": True}))
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    logprobs = [choice["logprobs"] for choice in choices if choice.get("logprobs")]
    assert bool(logprobs) == (case == "logprobs")
    assert all(item["refusal"] is None for item in logprobs)
    for chunk in chunks:
        spec.check("CreateChatCompletionStreamResponse", chunk)


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_completion_is_openais(engine: Engine, spec: OpenAPI, logprobs: int | None) -> None:
    # Not its stream: the schema, which OpenAI says its chunks share, has no null
    # finish_reason, which every chunk but the last has (OpenAI's own too).
    body = {"prompt": "One, two,", "max_tokens": 4, "temperature": 0, "logprobs": logprobs}
    spec.check("CreateCompletionResponse", post(engine, "/v1/completions", body).json())


@pytest.mark.parametrize("case", list(RESPONSES))
def test_a_whole_response_is_openais(engine: Engine, spec: OpenAPI, case: str) -> None:
    """createResponse's 200 application/json: `Response`, whose function tools OpenAI
    echoes with every field (`strict` and `parameters` null when not given). The
    description is stricter than OpenAI, which says `"usage": null` (in a stream, until
    its end) and `"user": null`: it types them as an object and a string that may be
    absent, and absent they are here."""
    whole = post(engine, "/v1/responses", RESPONSES[case]).json()
    spec.check("Response", whole)
    kinds = [item["type"] for item in whole["output"]]
    assert kinds == (["function_call"] if case == "function call" else ["message"])


@pytest.mark.parametrize("case", list(RESPONSES))
def test_a_response_stream_is_openais(engine: Engine, spec: OpenAPI, case: str) -> None:
    """createResponse's text/event-stream: each event is its own member of
    `ResponseStreamEvent` (checked against it, a failure says where), in OpenAI's order."""
    found = named_events(post(engine, "/v1/responses", {**RESPONSES[case], "stream": True}))
    for event in found:
        spec.check(spec.member("ResponseStreamEvent", event["type"]), event)
    kinds = [event["type"] for event in found]
    text = ["response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done"]  # fmt: skip
    call = ["response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done"]  # fmt: skip
    body = dict.fromkeys(kinds[2:-1])  # in order, each once
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert list(body) == (call if case == "function call" else text), kinds
    assert found[-1]["response"]["output"] == [found[-2]["item"]]


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_response_is_openais_error(engine: Engine, spec: OpenAPI, case: str) -> None:
    answer = httpx.post(
        f"{engine.base_url}/v1/responses",
        json={"model": engine.model, **REFUSED[case]},
        headers={"Authorization": f"Bearer {engine.api_key}"},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    spec.check("ErrorResponse", answer.json())
    assert set(answer.json()["error"]) == ENVELOPE


def test_a_read_back_is_openais(engine: Engine, spec: OpenAPI) -> None:
    """`max_tokens` 0 with `echo`: the prompt, nothing generated (see test_read_back.py)."""
    body = {"prompt": "One, two,", "max_tokens": 0, "echo": True}
    spec.check("CreateCompletionResponse", post(engine, "/v1/completions", body).json())


def test_a_models_created_is_its_files_time(engine: Engine, spec: OpenAPI) -> None:
    """llama-server said the time of each call, llama_cpp nothing."""
    created = int(default_model().stat().st_mtime)
    client = engine.client()
    for _ in range(2):  # the same on every call
        listing = client.models.with_raw_response.list()
        spec.check("ListModelsResponse", listing.http_response.json())
        assert [model.created for model in listing.parse().data] == [created]
        model = client.models.with_raw_response.retrieve(engine.model)
        spec.check("Model", model.http_response.json())
        assert model.parse().created == created


def test_a_model_is_owned_by_llamaserve_on_both_engines(engine: Engine) -> None:
    """llama-server said "llamacpp", llama_cpp "me": the engine showed through."""
    client = engine.client()
    assert [model.owned_by for model in client.models.list().data] == ["llamaserve"]
    assert client.models.retrieve(engine.model).owned_by == "llamaserve"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
     ("POST", "/v1/models", "GET"), ("DELETE", "/v1/models/{model}", "GET"),
     ("POST", "/health", "GET")],
)  # fmt: skip
def test_a_wrong_method_is_405_naming_the_routes_method(
    engine: Engine, method: str, path: str, allow: str
) -> None:
    response = httpx.request(
        method,
        f"{engine.base_url}{path.format(model=engine.model)}",
        headers={"Authorization": f"Bearer {engine.api_key}"},
    )
    assert response.status_code == 405, response.text
    assert response.headers.get_list("allow") == [allow]
    error = response.json()["error"]
    assert set(error) == ENVELOPE and error["type"] == "invalid_request_error"


def test_every_answer_has_a_request_id_of_its_own(engine: Engine) -> None:
    auth = {"Authorization": f"Bearer {engine.api_key}"}
    chat = {"model": engine.model, "messages": CHAT, "max_tokens": 2}
    with httpx.Client(base_url=engine.base_url, timeout=60) as http:
        answers = [
            http.get("/health"),
            http.get("/v1/models", headers=auth),
            http.get("/v1/models", headers=auth),
            http.get(f"/v1/models/{engine.model}", headers=auth),
            http.post("/v1/chat/completions", json=chat, headers=auth),
            http.post("/v1/chat/completions", json={**chat, "stream": True}, headers=auth),
            http.post("/v1/completions", json={"model": engine.model}, headers=auth),
            http.get("/v1/models"),
            http.get("/v1/models", headers={"Authorization": "Bearer wrong-key"}),
            http.get("/v1/unknown"),
            http.get("/v1/chat/completions", headers=auth),
            http.get("/v1/models/gpt-4o", headers=auth),
            http.post("/v1/embeddings", json={"input": "Hi"}, headers=auth),
            # A client's id is not the answer's (llama_cpp answered with it, or refused it).
            http.get("/v1/models", headers={**auth, "X-Request-Id": "not-a-uuid"}),
            http.get("/v1/models", headers={**auth, "X-Request-Id": str(CLIENTS_ID)}),
            http.get("/v1/models", headers={**auth, "X-Request-Id": str(CLIENTS_ID)}),
        ]
    statuses = [200] * 6 + [400, 401, 401, 404, 405, 404, 404] + [200] * 3
    assert [answer.status_code for answer in answers] == statuses
    assert answers[5].headers["content-type"].startswith("text/event-stream")
    ids = [answer.headers.get_list("x-request-id") for answer in answers]
    assert all(len(found) == 1 and found[0] for found in ids), ids
    assert len({found[0] for found in ids}) == len(answers)
