"""The chat format the README recommends for tool calls on any model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessage

from tests.conftest import ENGINES, Project, default_model, make_project

pytestmark = pytest.mark.slow  # each engine, started by its module fixture

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TOOLS = [{"type": "function", "function": {"name": "record", "parameters": PERSON}}]
ASK = [{"role": "user", "content": "Jason is 30 years old. Record him."}]


@pytest.fixture(scope="module", params=ENGINES)
def function_calling(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenAI]:
    """With llama-server the format is llama.cpp's chatml template; the relay forces calls."""
    runtime: Path = tmp_path_factory.mktemp("fc") / "runtime"
    project: Project = make_project(
        runtime, LLAMA_CHAT_FORMAT="chatml-function-calling", LLAMA_ENGINE=request.param
    )
    started = project.console("start")
    assert started.returncode == 0, started.stdout + started.stderr
    config = dict(
        line.replace('"', "").split("=", 1)
        for line in (runtime / "config.env").read_text().splitlines()
        if line.startswith("LLAMA_SERVER_")
    )
    port, key = config["LLAMA_SERVER_PORT"], config["LLAMA_SERVER_API_KEY"]
    try:
        with OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as client:
            yield client
    finally:
        project.console("stop")


def ask(client: OpenAI, tool_choice: Any) -> ChatCompletionMessage:
    response = client.chat.completions.create(
        model=default_model().name,
        messages=ASK,
        max_tokens=80,
        temperature=0,
        tools=TOOLS,
        tool_choice=tool_choice,
    )
    return response.choices[0].message


def test_forced_tool_call_with_chatml_function_calling(function_calling: OpenAI) -> None:
    calls = ask(function_calling, {"type": "function", "function": {"name": "record"}}).tool_calls
    assert calls and calls[0].function.name == "record"
    jsonschema.validate(json.loads(calls[0].function.arguments), PERSON)


def test_tool_choice_auto_answers_with_a_call_or_a_message(function_calling: OpenAI) -> None:
    message = ask(function_calling, "auto")
    if message.tool_calls:
        jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), PERSON)
    else:
        assert isinstance(message.content, str)
