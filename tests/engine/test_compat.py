"""What llama-cpp-python's front sends its engine (`compat.rewrite_request`), where the
engine's own defaults or chat format would answer otherwise than OpenAI and llama-server.
Their effect on the model is tested in test_openai_api.py, on both engines."""

from __future__ import annotations

import json
from typing import Any

from llamaserve.engine.compat import rewrite_request

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
