"""Concurrent requests queue at the engine; none is cut off."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from tests.conftest import Engine


def stream_to_end(client: OpenAI, model: str, n: int) -> tuple[str, str | None]:
    text, finish = "", None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Count to {n}."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_three_overlapping_streams_all_complete(engine: Engine) -> None:
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(lambda n: stream_to_end(engine.client(), engine.model, n), [1, 2, 3])
        )
    for text, finish in results:
        assert finish in ("stop", "length")
        assert text
