"""Bad input on an engine's own port is a 400 or 404 in OpenAI's envelope, never a 500,
and no parameter of llama.cpp's own gets past `max_tokens`: each engine, the real model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ENVELOPE, Engine

MESSAGES = [{"role": "user", "content": "Count from one to one hundred."}]

BAD_BODIES = {
    "nested arrays": b"[" * 100_000 + b"]" * 100_000,
    "nested objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "NaN": b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "min_p": NaN}',
    "Infinity": b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
    b'"repeat_penalty": Infinity}',
    "lone surrogate": b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "overflow": b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
    b'"temperature": 1e999}',
    "no model": b'{"messages": [{"role": "user", "content": "Hi"}]}',
    "assistant without content": b'{"model": "%s", "messages": [{"role": "assistant"}]}',
    "custom tool call": json.dumps(
        {
            "model": "%s",
            "messages": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "custom", "custom": {"name": "f", "input": "x"}}
                    ],
                },
                {"role": "user", "content": "Go on"},
            ],
        }
    ).encode(),
}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == ENVELOPE
    return error


def post(url: str, key: str, body: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(url + path, content=body, headers=headers, timeout=120)


def usage_of_stream(url: str, key: str, **params: Any) -> dict[str, int]:
    """The usage a stream of MESSAGES reports, with `params`; its content chunks counted."""
    body = {"messages": MESSAGES, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}, **params}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    usage: dict[str, int] = {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=120) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
    return usage


@pytest.mark.parametrize("name", BAD_BODIES)
def test_a_body_no_engine_can_take_is_a_400(engine: Engine, name: str) -> None:
    body = BAD_BODIES[name].replace(b"%s", engine.model.encode())
    error = error_of(post(engine.base_url, engine.api_key, body), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", ["%E2%80%A8", "%F0%9F%A6%99", "%ff", "%00", "a%0d%0ab"])
def test_a_model_id_of_any_bytes_is_not_found(engine: Engine, model: str) -> None:
    headers = {"Authorization": f"Bearer {engine.api_key}"}
    response = httpx.get(f"{engine.base_url}/v1/models/{model}", headers=headers, timeout=30)
    assert error_of(response, 404)["code"] == "model_not_found"


@pytest.mark.parametrize(
    "lengths",
    [
        {"max_tokens": 4, "n_predict": 64},
        {"max_tokens": 4, "n_predict": -1},
        {"n_predict": 4},
        {"max_completion_tokens": 4},
        {"max_completion_tokens": 64, "max_tokens": 4},
    ],
)
def test_max_tokens_is_the_one_bound_on_generation(engine: Engine, lengths: dict[str, int]) -> None:
    usage = usage_of_stream(engine.base_url, engine.api_key, model=engine.model, **lengths)
    assert 1 <= usage["completion_tokens"] <= 4


def test_llama_cpps_own_n_is_refused(engine: Engine) -> None:
    body = json.dumps({"model": engine.model, "messages": MESSAGES, "n_cmpl": 3}).encode()
    assert error_of(post(engine.base_url, engine.api_key, body), 400)["param"] == "n_cmpl"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_parameters_given_as_null_are_as_not_given(engine: Engine, path: str) -> None:
    """llama_cpp passed a null penalty on to C (ctypes: wrong type), a 500; found by
    fuzzing with OpenAI's own API description (bench/fuzz.py)."""
    nulls = {"frequency_penalty": None, "presence_penalty": None, "seed": None, "stop": None}
    prompt = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "Hi"}
    body = json.dumps({"model": engine.model, "max_tokens": 2, **prompt, **nulls}).encode()
    response = post(engine.base_url, engine.api_key, body, path)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_a_body_is_json_whatever_content_type_the_client_names(engine: Engine) -> None:
    """llama_cpp read a text/plain body as no JSON at all: a 500 (found by bench/fuzz.py)."""
    body = json.dumps({"model": engine.model, "messages": MESSAGES, "max_tokens": 2})
    headers = {"Authorization": f"Bearer {engine.api_key}", "Content-Type": "text/plain"}
    response = httpx.post(f"{engine.base_url}/v1/chat/completions", content=body,
                          headers=headers, timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None
