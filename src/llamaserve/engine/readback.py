"""A completion that reads back its prompt: `max_tokens` 0 with `echo`, which OpenAI
allows to score or read back a prompt. Nothing is generated, and no engine is asked to:
both take a bound below 1 as no bound at all. Each front finds the prompt's text and
counts its tokens with its engine's own tokenizer; the answer, whole or streamed, is
built here for both.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.types import Send

from llamaserve.engine.protocol import prompts
from llamaserve.http.answer import Answer


@dataclass(frozen=True)
class ReadBack:
    prompt: str | list[int]  # its text, or its token ids
    model: str
    stream: bool
    include_usage: bool

    @classmethod
    def of(cls, body: dict[str, Any]) -> ReadBack | None:
        """The read-back a checked completion request asks for, if it asks for one."""
        if body.get("max_tokens") != 0 or body.get("echo") is not True:
            return None
        [prompt] = prompts(body["prompt"])  # one: see check_completion
        stream = body.get("stream") is True
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        return cls(prompt, body["model"], stream, stream and include_usage)

    async def answer(self, send: Send, text: str, prompt_tokens: int) -> None:
        """OpenAI's answer: the prompt's `text` as the choice's, finish_reason `length`;
        streamed, a chunk of the text, then the finish, then usage if asked for."""
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }
        count = prompt_tokens
        usage = {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count}
        answer = Answer(send)
        if not self.stream:
            await answer.json({**head, "choices": [_choice(text, "length")], "usage": usage})
            return
        await answer.event({**head, "choices": [_choice(text, None)]})
        await answer.event({**head, "choices": [_choice("", "length")]})
        if self.include_usage:
            await answer.event({**head, "choices": [], "usage": usage})
        await answer.done()


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
