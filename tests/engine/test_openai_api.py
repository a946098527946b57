"""Every parameter of the spec's table, through the official SDK, against the real model."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.conftest import Engine, default_model

CHAT = [{"role": "user", "content": "Write a list of fruits."}]
# A prompt after which the 270M model closes its JSON object within 300 tokens with both
# engines, whatever request came before (llama-cpp-python reuses the previous prompt's cache).
JSON_PROMPT = "Reply with a JSON object."
REPETITIVE = "the the the the the the the the"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def chat_text(client: OpenAI, engine: Engine, **params: object) -> str:
    response = client.chat.completions.create(
        model=engine.model,
        messages=CHAT,
        max_tokens=24,
        **params,  # type: ignore[arg-type]
    )
    return response.choices[0].message.content or ""


def complete_text(client: OpenAI, engine: Engine, **params: object) -> str:
    response = client.completions.create(
        model=engine.model,
        prompt=REPETITIVE,
        max_tokens=16,
        **params,  # type: ignore[arg-type]
    )
    return response.choices[0].text


def test_models_lists_exactly_the_model_file(client: OpenAI, engine: Engine) -> None:
    assert [m.id for m in client.models.list().data] == [engine.model]


def test_retrieve_model_answers_for_the_served_model_only(client: OpenAI, engine: Engine) -> None:
    model = client.models.retrieve(engine.model)
    assert (model.id, model.object) == (engine.model, "model")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert set(info.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        engine.client(api_key="wrong-key").models.retrieve(engine.model)


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_bounds_length_and_reports_length(
    client: OpenAI, engine: Engine, max_tokens: int
) -> None:
    chat = client.chat.completions.create(
        model=engine.model, messages=CHAT, max_tokens=max_tokens, temperature=0
    )
    assert chat.usage is not None and chat.usage.completion_tokens == max_tokens
    assert chat.choices[0].finish_reason == "length"
    completion = client.completions.create(
        model=engine.model, prompt=REPETITIVE, max_tokens=max_tokens, temperature=0
    )
    assert completion.usage is not None and completion.usage.completion_tokens == max_tokens
    assert completion.choices[0].finish_reason == "length"


def test_temperature_zero_is_deterministic(client: OpenAI, engine: Engine) -> None:
    assert chat_text(client, engine, temperature=0) == chat_text(client, engine, temperature=0)


def test_seed_repeats_sampling(client: OpenAI, engine: Engine) -> None:
    first = chat_text(client, engine, temperature=1.0, seed=1234)
    assert chat_text(client, engine, temperature=1.0, seed=1234) == first
    completion = complete_text(client, engine, temperature=1.0, seed=99)
    assert complete_text(client, engine, temperature=1.0, seed=99) == completion


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_sequences_end_the_text(client: OpenAI, engine: Engine, as_list: bool) -> None:
    free = chat_text(client, engine, temperature=0)
    word = free.split()[2]  # a stop string that greedy decoding is known to produce
    stop: str | list[str] = [word, "never-produced-stop"] if as_list else word
    response = client.chat.completions.create(
        model=engine.model, messages=CHAT, max_tokens=24, temperature=0, stop=stop
    )
    text = response.choices[0].message.content or ""
    assert word not in text
    assert free.startswith(text)
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "sampling",
    [{"top_k": 1}, {"top_p": 0.001}, {"min_p": 0.99}],
    ids=["top_k", "top_p", "min_p"],
)
def test_sampling_controls_reduce_to_greedy(
    client: OpenAI, engine: Engine, sampling: dict[str, float]
) -> None:
    greedy = chat_text(client, engine, temperature=0)
    sampling = dict(sampling)  # the parameter is shared by both engines' runs: never mutate it
    top_p = sampling.pop("top_p", None)
    params: dict[str, object] = {"temperature": 1.0, "seed": 7, "extra_body": sampling}
    if top_p is not None:
        params["top_p"] = top_p
    assert chat_text(client, engine, **params) == greedy


def test_typical_p_reaches_the_sampler(client: OpenAI, engine: Engine) -> None:
    wide = chat_text(client, engine, temperature=1.0, seed=5, extra_body={"typical_p": 1.0})
    narrow = chat_text(client, engine, temperature=1.0, seed=5, extra_body={"typical_p": 0.05})
    assert narrow != wide


@pytest.mark.parametrize(
    "penalty",
    [
        {"extra_body": {"repeat_penalty": 2.0}},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
    ],
    ids=["repeat_penalty", "presence_penalty", "frequency_penalty"],
)
def test_penalties_change_a_repetitive_continuation(
    client: OpenAI, engine: Engine, penalty: dict[str, object]
) -> None:
    baseline = complete_text(client, engine, temperature=0, extra_body={"repeat_penalty": 1.0})
    assert baseline.split() == ["the"] * len(baseline.split())  # the model repeats itself
    penalty = dict(penalty)  # the parameter is shared by both engines' runs: never mutate it
    extra = {"repeat_penalty": 1.0, **penalty.pop("extra_body", {})}  # type: ignore[dict-item]
    assert complete_text(client, engine, temperature=0, extra_body=extra, **penalty) != baseline


def test_system_and_developer_messages_reach_the_model(client: OpenAI, engine: Engine) -> None:
    """The gemma format has no system turn: llama_cpp's dropped system messages and
    refused `developer` ones; both now go before the user's text, as llama.cpp's own
    gemma template puts them, on both engines alike."""

    def prompt_tokens(messages: list[dict[str, str]]) -> int:
        response = client.chat.completions.create(
            model=engine.model,
            messages=messages,
            max_tokens=1,
            temperature=0,  # type: ignore[arg-type]
        )
        assert response.usage is not None
        return response.usage.prompt_tokens

    alone = prompt_tokens(CHAT)
    instruction = "You are a pirate. Answer like one."
    for role in ("system", "developer"):
        assert prompt_tokens([{"role": role, "content": instruction}, *CHAT]) > alone + 5, role


def test_logit_bias_bans_a_token(client: OpenAI, engine: Engine, vocab: Any) -> None:
    def tokens(**params: object) -> list[str]:
        response = client.completions.create(
            model=engine.model,
            prompt=REPETITIVE,
            max_tokens=8,
            temperature=0,
            logprobs=1,
            **params,  # type: ignore[arg-type]
        )
        assert response.choices[0].logprobs is not None
        return list(response.choices[0].logprobs.tokens or [])

    first = tokens()[0]
    ids = vocab.tokenize(first.encode(), add_bos=False, special=True)
    assert len(ids) == 1, (first, ids)
    banned = tokens(logit_bias={str(ids[0]): -100})
    assert banned and first not in banned


@pytest.fixture(scope="module")
def vocab() -> Any:
    """The model's tokenizer, to name a token by its id."""
    import llama_cpp

    return llama_cpp.Llama(str(default_model()), vocab_only=True, verbose=False)


def test_chat_logprobs_have_openai_shape(client: OpenAI, engine: Engine) -> None:
    response = client.chat.completions.create(
        model=engine.model,
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert len(logprobs.content) == 5
    for item in logprobs.content:
        assert isinstance(item.token, str) and item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert all(alt.logprob <= 0 for alt in item.top_logprobs)


def test_completion_logprobs_have_the_requested_count(client: OpenAI, engine: Engine) -> None:
    response = client.completions.create(
        model=engine.model, prompt=REPETITIVE, max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs
    assert len(logprobs.tokens) == 4
    assert all(len(alternatives) == 2 for alternatives in logprobs.top_logprobs)


def test_response_format_json_object(client: OpenAI, engine: Engine) -> None:
    """Every answer is held to JSON: one that ends is a JSON object, one cut at max_tokens
    the start of one. The 270M base model rambles inside JSON strings, and where it stops
    at a given repetition penalty changes with the machine's build of llama.cpp (1.5
    stopped on one machine and rambled on another): a few penalties are tried, and one
    of them must give a whole object."""
    finished = []
    for penalty in (1.4, 1.3, 1.5, 1.6):
        response = client.chat.completions.create(
            model=engine.model,
            messages=[{"role": "user", "content": JSON_PROMPT}],
            max_tokens=300,
            temperature=0,
            extra_body={"repeat_penalty": penalty},
            response_format={"type": "json_object"},
        )
        choice = response.choices[0]
        content = choice.message.content or ""
        assert content.lstrip().startswith("{"), (penalty, content)
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(content), dict), (penalty, content)
            finished.append(penalty)
            break
        assert choice.finish_reason == "length", (penalty, choice.finish_reason)
    assert finished, "no penalty gave a whole JSON object"


def test_response_format_json_schema(client: OpenAI, engine: Engine) -> None:
    response = client.chat.completions.create(
        model=engine.model,
        messages=[{"role": "user", "content": "Give a person as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content or ""), PERSON)


# A request whose answer must be a call of `record` with a PERSON.
FORCED_RECORD: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Jason is 30 years old."}],
    "max_tokens": 60,
    "temperature": 0,
    "tools": [{"type": "function", "function": {"name": "record", "parameters": PERSON}}],
    "tool_choice": {"type": "function", "function": {"name": "record"}},
}


def test_forced_tool_call_validates(client: OpenAI, engine: Engine) -> None:
    response = client.chat.completions.create(model=engine.model, **FORCED_RECORD)
    calls = response.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "record"
    jsonschema.validate(json.loads(calls[0].function.arguments), PERSON)


def test_a_streamed_tool_call_joins_into_one_call(client: OpenAI, engine: Engine) -> None:
    """The SDK's stream helper joins the deltas: a name or id sent again in every delta
    (llama_cpp did so) came out as "recordrecordrecord..."."""
    with client.chat.completions.stream(model=engine.model, **FORCED_RECORD) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and len(calls) == 1 and calls[0].function.name == "record"
    assert calls[0].id and len(calls[0].id) < 64  # one id, not several joined
    jsonschema.validate(json.loads(calls[0].function.arguments), PERSON)


def test_forced_legacy_function_call_validates(client: OpenAI, engine: Engine) -> None:
    response = client.chat.completions.create(
        model=engine.model,
        messages=[{"role": "user", "content": "Jason is 30 years old."}],
        max_tokens=60,
        temperature=0,
        functions=[{"name": "record", "parameters": PERSON}],
        function_call={"name": "record"},
    )
    call = response.choices[0].message.function_call
    assert call is not None and call.name == "record"
    jsonschema.validate(json.loads(call.arguments), PERSON)


def test_stream_sends_chunks_then_finish_reason(client: OpenAI, engine: Engine) -> None:
    chunks = list(
        client.chat.completions.create(
            model=engine.model, messages=CHAT, max_tokens=8, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # usage only when asked for


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_stream_include_usage_ends_with_usage(client: OpenAI, engine: Engine, kind: str) -> None:
    common = {"model": engine.model, "max_tokens": 9, "temperature": 0}
    if kind == "chat":
        plain = client.chat.completions.create(messages=CHAT, **common)  # type: ignore[call-overload]
        chunks = list(
            client.chat.completions.create(
                messages=CHAT, stream=True, stream_options={"include_usage": True}, **common
            )
        )  # type: ignore[call-overload]
    else:
        plain = client.completions.create(prompt=REPETITIVE, **common)  # type: ignore[call-overload]
        chunks = list(
            client.completions.create(
                prompt=REPETITIVE, stream=True, stream_options={"include_usage": True}, **common
            )
        )  # type: ignore[call-overload]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage == plain.usage
    assert [c for c in chunks[:-1] if c.choices][-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("api_key", ["wrong-key", ""])
def test_wrong_or_missing_key_is_401_envelope(engine: Engine, api_key: str) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{engine.base_url}/v1/models", headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        engine.client(api_key="wrong-key").models.list()


@pytest.mark.parametrize("path", ["/v1/unknown", "/slots", "/docs", "/extras/tokenize"])
def test_paths_that_are_no_openai_route_are_404_alike_on_both_engines(
    engine: Engine, path: str
) -> None:
    import httpx

    for headers in ({"Authorization": f"Bearer {engine.api_key}"}, {}):  # before the key
        response = httpx.get(f"{engine.base_url}{path}", headers=headers)
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": f"Unknown path {path}.",
            "type": "not_found_error",
            "param": None,
            "code": "unknown_url",
        }


def test_the_key_is_checked_before_the_body(engine: Engine) -> None:
    import httpx

    response = httpx.post(
        f"{engine.base_url}/v1/chat/completions", content=b"{not json",
        headers={"Authorization": "Bearer wrong-key", "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Incorrect API key provided."


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_api_key"), ({"Authorization": "Basic abc"}, "invalid_authorization_header")],
)
def test_a_missing_or_malformed_key_is_named_as_the_gateway_names_it(
    engine: Engine, headers: dict[str, str], code: str
) -> None:
    import httpx

    response = httpx.get(f"{engine.base_url}/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_n_above_one_is_refused_not_ignored(client: OpenAI, engine: Engine) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.model, messages=CHAT, max_tokens=1, n=2)
    assert info.value.body["param"] == "n"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "values"),
    [("chat", {"messages": []}), ("chat", {"max_tokens": 0}), ("completions", {"max_tokens": -1}),
     ("chat", {"temperature": 2.5}), ("completions", {"top_p": 1.5}),
     ("chat", {"presence_penalty": -3}), ("completions", {"frequency_penalty": 2.1})],
)  # fmt: skip
def test_values_openai_refuses_are_400_naming_the_parameter(
    client: OpenAI, engine: Engine, kind: str, values: dict[str, Any]
) -> None:
    # max_tokens below 1 would otherwise run llama-server until the context is full.
    with pytest.raises(openai.BadRequestError) as info:
        if kind == "chat":
            client.chat.completions.create(**{"model": engine.model, "messages": CHAT, **values})
        else:
            client.completions.create(**{"model": engine.model, "prompt": "Hi", **values})
    assert info.value.body["param"] == next(iter(values))  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "values", "param", "says"),
    [("chat", {"stream": "yes"}, "stream", "expected a boolean, but got a string"),
     ("chat", {"max_tokens": "5"}, "max_tokens", "expected an integer, but got a string"),
     ("chat", {"stop": 5}, "stop", "expected a string or an array, but got an integer"),
     ("chat", {"logprobs": "yes"}, "logprobs", "expected a boolean"),
     ("chat", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role",
      "'system', 'developer', 'user', 'assistant', 'tool' or 'function'"),
     ("chat", {"messages": [{"content": "Hi"}]}, "messages.0.role", "Missing required"),
     ("chat", {"messages": [{"role": "tool", "content": "4", "tool_call_id": None}]},
      "messages.0.tool_call_id", "Missing required"),
     ("chat", {"logit_bias": {"abc": 1}}, "logit_bias.abc", "a token id"),
     ("chat", {"response_format": {"type": "xml"}}, "response_format.type",
      "'text', 'json_object' or 'json_schema'"),
     ("chat", {"tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
     ("completions", {"logprobs": 50}, "logprobs", "less than or equal to 5"),
     ("completions", {"prompt": ["A", "B"]}, "prompt", "One prompt per request"),
     ("completions", {"prompt": [[1, 2], [3]]}, "prompt", "One prompt per request")],
)  # fmt: skip
def test_wrong_types_and_values_are_400_in_openais_words(
    engine: Engine, kind: str, values: dict[str, Any], param: str, says: str
) -> None:
    # Both engines: before, some were taken loosely ("yes" streamed), ignored (a logit_bias
    # by token text) or answered 500 (several prompts).
    import httpx

    base = {"messages": CHAT} if kind == "chat" else {"prompt": "Hi"}
    response = httpx.post(
        f"{engine.base_url}/v1/{'chat/completions' if kind == 'chat' else 'completions'}",
        json={"model": engine.model, "max_tokens": 2, **base, **values},
        headers={"Authorization": f"Bearer {engine.api_key}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert says in error["message"]


def test_a_prompt_list_of_one_is_one_prompt(client: OpenAI, engine: Engine) -> None:
    response = client.completions.create(model=engine.model, prompt=["Hi"], max_tokens=2)
    assert len(response.choices) == 1 and response.usage and response.usage.completion_tokens


def test_images_are_refused_by_a_text_model(client: OpenAI, engine: Engine) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    body: Any = info.value.body
    assert (body["param"], body["code"]) == ("messages.0.content", "unsupported_content")
    text = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    answer = client.chat.completions.create(model=engine.model, messages=text, max_tokens=2)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("prompt", ["The sky is", [2, 818, 7217, 563]], ids=["text", "tokens"])
def test_echo_puts_the_prompt_before_the_answer(
    client: OpenAI, engine: Engine, prompt: str | list[int]
) -> None:
    # llama-server ignores echo, and llama-cpp-python echoes a whole answer only: the
    # fronts put the prompt's text before the answer.
    if not isinstance(prompt, str) and engine.name == "llama-cpp-python":
        pytest.skip("llama-cpp-python takes no token ids as a prompt (400)")

    def complete(echo: bool, stream: bool) -> str:
        params: Any = {"model": engine.model, "prompt": prompt, "max_tokens": 4}
        params.update(temperature=0, seed=1, echo=echo, stream=stream)
        if not stream:
            return client.completions.create(**params).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(**params) if c.choices)

    plain = complete(echo=False, stream=False)
    echoed = complete(echo=True, stream=False)
    assert plain and echoed.endswith(plain) and len(echoed) > len(plain)
    if isinstance(prompt, str):
        assert echoed == prompt + plain
    assert complete(echo=True, stream=True) == echoed


def test_answers_carry_no_engine_timings(engine: Engine) -> None:
    # llama-server adds its own `timings` to the last chunk with choices.
    import httpx

    cases = [(path, stream, stop) for path in ("chat/completions", "completions")
             for stream in (False, True) for stop in (None, ["\n"])]  # fmt: skip
    for path, stream, stop in cases:
        base = {"messages": CHAT} if path.startswith("chat") else {"prompt": "One, two,"}
        response = httpx.post(
            f"{engine.base_url}/v1/{path}",
            json={"model": engine.model, **base, "max_tokens": 8, "stream": stream, "stop": stop},
            headers={"Authorization": f"Bearer {engine.api_key}"},
            timeout=60,
        )
        assert response.status_code == 200 and "choices" in response.text
        assert "timings" not in response.text


def test_embeddings_are_a_404_naming_the_model(client: OpenAI, engine: Engine) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model=engine.model, input="hello")
    body: Any = info.value.body
    assert (body["param"], body["code"]) == ("model", "model_not_supported")
    assert engine.model in body["message"] and "not embeddings" in body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "MODEL", "messages": "not a list"}', "messages"),
        (b'{"messages": [{"role": "user", "content": "Hi"}]}', "model"),
    ],
    ids=["malformed", "not-an-object", "wrong-type", "no-model"],
)
def test_bad_requests_are_400_envelopes(engine: Engine, body: bytes, param: str | None) -> None:
    import httpx

    response = httpx.post(
        f"{engine.base_url}/v1/chat/completions",
        content=body.replace(b"MODEL", engine.model.encode()),
        headers={"Authorization": f"Bearer {engine.api_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
