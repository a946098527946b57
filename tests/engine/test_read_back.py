"""`max_tokens` 0 with `echo` on /v1/completions: the prompt read back, nothing generated,
as OpenAI answers it (to score or read back a prompt), with the prompt's tokens counted
by the engine itself. `max_tokens` 0 is refused otherwise: both engines would take it as
no bound at all. Each engine, the real model, through the official SDK."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import CompletionUsage

from tests.conftest import Engine

PROMPT = "The sky is blue.\n\nÜber 🦙 <bos>"  # a special token's text is read as that token
TOKENS = [2, 818, 7217, 563]  # <bos>The sky is


def counted(client: OpenAI, engine: Engine, prompt: str | list[int]) -> CompletionUsage:
    """The usage of reading `prompt` back: the engine's own count of its tokens, from a
    completion of one token."""
    one = client.completions.create(model=engine.model, prompt=prompt, max_tokens=1)
    assert one.usage is not None and one.usage.prompt_tokens > 0
    return CompletionUsage(
        prompt_tokens=one.usage.prompt_tokens,
        completion_tokens=0,
        total_tokens=one.usage.prompt_tokens,
    )


@pytest.mark.parametrize("prompt", [PROMPT, [PROMPT]], ids=["string", "list of one"])
def test_a_prompt_is_read_back_and_nothing_generated(
    client: OpenAI, engine: Engine, prompt: str | list[str]
) -> None:
    answer = client.completions.create(model=engine.model, prompt=prompt, max_tokens=0, echo=True)
    [choice] = answer.choices
    assert (choice.text, choice.finish_reason, choice.logprobs) == (PROMPT, "length", None)
    assert answer.usage == counted(client, engine, PROMPT)
    assert (answer.object, answer.model) == ("text_completion", engine.model)
    assert answer.id.startswith("cmpl-")


@pytest.mark.parametrize("include_usage", [False, True], ids=["no usage", "usage"])
def test_a_read_back_streams_the_prompt_then_the_finish(
    client: OpenAI, engine: Engine, include_usage: bool
) -> None:
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    chunks = list(
        client.completions.create(model=engine.model, prompt=PROMPT, max_tokens=0, echo=True,
                                  stream=True, stream_options=options)
    )  # fmt: skip
    choices = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert choices == [(PROMPT, None), ("", "length")]
    assert len({(chunk.id, chunk.created) for chunk in chunks}) == 1
    if include_usage:
        assert len(chunks) == 3 and chunks[-1].choices == []
        assert chunks[-1].usage == counted(client, engine, PROMPT)
    else:
        assert len(chunks) == 2 and all(chunk.usage is None for chunk in chunks)


def test_a_prompt_of_token_ids_is_read_back_as_its_text(client: OpenAI, engine: Engine) -> None:
    if engine.name == "llama-cpp-python":
        pytest.skip("llama-cpp-python takes no token ids as a prompt (400)")
    answer = client.completions.create(model=engine.model, prompt=TOKENS, max_tokens=0, echo=True)
    echoed = client.completions.create(
        model=engine.model, prompt=TOKENS, max_tokens=1, echo=True, temperature=0
    )
    assert answer.choices[0].text.endswith("The sky is")
    assert echoed.choices[0].text.startswith(answer.choices[0].text)
    assert answer.usage == counted(client, engine, TOKENS)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_a_token_id_outside_the_vocabulary_is_a_400(
    client: OpenAI, engine: Engine, max_tokens: int
) -> None:
    """llama-server's /detokenize, which reads a prompt of ids back, answered it with a 500
    (llama-cpp-python takes no token ids: `prompt.0` is no string)."""
    if engine.name == "llama-cpp-python" and max_tokens:
        pytest.skip("llama-cpp-python takes no token ids as a prompt (400): its read-back only")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=engine.model, prompt=[2, 10**9], max_tokens=max_tokens, echo=True
        )
    assert info.value.body["param"] in ("prompt", "prompt.0")  # type: ignore[index]


@pytest.mark.parametrize(
    ("route", "values", "param", "says"),
    [("completions", {}, "max_tokens", "or 0 with 'echo' true"),
     ("completions", {"echo": False}, "max_tokens", "or 0 with 'echo' true"),
     ("completions", {"echo": True, "logprobs": 0}, "logprobs", "prompt's logprobs"),
     ("chat", {"extra_body": {"echo": True}}, "max_tokens", "greater than or equal to 1")],
    ids=["completion", "completion without echo", "completion with logprobs", "chat"],
)  # fmt: skip
def test_max_tokens_0_is_refused_but_to_read_back_a_prompt(
    client: OpenAI, engine: Engine, route: str, values: dict[str, Any], param: str, says: str
) -> None:
    """Else an engine would generate until the context is full; and neither engine gives
    a prompt's logprobs, which OpenAI returns with a read-back."""
    with pytest.raises(openai.BadRequestError) as info:
        if route == "chat":
            messages: Any = [{"role": "user", "content": PROMPT}]
            client.chat.completions.create(model=engine.model, messages=messages, max_tokens=0,
                                           **values)  # fmt: skip
        else:
            client.completions.create(model=engine.model, prompt=PROMPT, max_tokens=0, **values)
    error: Any = info.value.body
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert says in error["message"]
    # The same prompt read back is answered: 0 is refused only where it would generate.
    answer = client.completions.create(model=engine.model, prompt=PROMPT, max_tokens=0, echo=True)
    assert answer.choices[0].text == PROMPT
