"""What llama-cpp-python's front sends its engine (`compat.rewrite_request`), where the
engine's own defaults or chat format would answer otherwise than OpenAI and llama-server.
Their effect on the model is tested in test_openai_api.py, on both engines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from llamaserve.engine.compat import ResponseMender, Usage, rewrite_request
from llamaserve.http import sse

MODEL = "model.gguf"


def sent(body: dict[str, Any], path: str = "/v1/chat/completions", **options: Any) -> Any:
    raw = json.dumps({"model": MODEL, **body}).encode()
    return json.loads(rewrite_request(raw, MODEL, path, **options).body)


def test_no_repetition_penalty_unless_asked() -> None:
    """llama_cpp's default is 1.1; OpenAI's and llama-server's, none (1.0)."""
    prompt = {"prompt": "the cat"}
    assert sent(prompt, "/v1/completions")["repeat_penalty"] == 1.0
    assert sent({**prompt, "repeat_penalty": 1.3}, "/v1/completions")["repeat_penalty"] == 1.3
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert sent(chat)["repeat_penalty"] == 1.0


def test_system_turns_go_before_the_next_user_text_for_gemma() -> None:
    messages = [
        {"role": "developer", "content": "Be brief. "},
        {"role": "system", "content": [{"type": "text", "text": "Answer as a pirate."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Ahoy"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    folded = sent({"messages": messages}, fold_system=True)["messages"]
    assert folded == [  # as llama.cpp's gemma template: trimmed, joined, then a blank line
        {"role": "user", "content": "Be brief.Answer as a pirate.\n\nHi"},
        {"role": "assistant", "content": "Ahoy"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    # Other formats have a system turn: developer messages become system ones.
    kept = sent({"messages": messages})["messages"]
    assert [m["role"] for m in kept] == ["system", "system", "user", "assistant", "user"]


def mended(stream: bytes, cut: int, usage: Usage, echo: str) -> tuple[bytes, ResponseMender]:
    """What the front sends of an engine's `stream` written in two pieces, cut at `cut`."""
    out: list[bytes] = []

    async def send(message: Any) -> None:
        out.append(message.get("body", b""))

    mender = ResponseMender(send, usage, echo=echo)
    start = [(b"content-type", b"text/event-stream")]

    async def relay() -> None:
        await mender.send({"type": "http.response.start", "status": 200, "headers": start})
        for piece, more in ((stream[:cut], True), (stream[cut:], True), (b"", False)):
            await mender.send({"type": "http.response.body", "body": piece, "more_body": more})

    asyncio.run(relay())
    return b"".join(out), mender


def test_a_stream_is_mended_event_by_event_however_its_writes_are_cut() -> None:
    """The engine's stream, its events cut across ASGI messages at any byte: the echo goes
    into the first chunk, the usage chunk before [DONE], and every event stays whole."""
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL}
    chunks = [{**head, "choices": [{"index": 0, "text": t}]} for t in ("A", "B")]
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks)
    stream += b"data: [DONE]\r\n\r\n"
    usage = Usage(prompt_tokens=3, completion_tokens=2)
    for cut in (1, 7, len(stream) // 2, len(stream) - 3):
        body, mender = mended(stream, cut, usage, echo="P:")
        events = [sse.Event.parse(raw) for raw in sse.EventSplitter().feed(body)]
        assert [e.done for e in events] == [False, False, False, True], (cut, body)
        first, second, last = (e.json() for e in events[:3])
        assert first is not None and first["choices"][0]["text"] == "P:A"
        assert second is not None and second["choices"][0]["text"] == "B"
        assert last is not None and last["usage"] == usage.as_dict() and last["choices"] == []
        assert mender.answer.finished
