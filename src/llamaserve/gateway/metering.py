"""What an engine's answer tells of a request, read as it is relayed: its tokens (the
engine's own usage, in each API's words), its time to first token, an error the stream
ended with, and whether the stream ended as its API ends one.

- chat and completions: usage in the last chunk (`stream_options.include_usage`, which
  the gateway asks for), `prompt_tokens` and `completion_tokens`; the end is `[DONE]`;
- Responses: usage in `response.completed` (or `.incomplete`), `input_tokens` and
  `output_tokens`; the end is that event, or an error then `[DONE]`;
- Messages: usage in `message_delta`, `input_tokens` (with `cache_read_input_tokens`
  where an engine counts those apart) and `output_tokens`; the end is `message_stop`
  or an `error` event.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from llamaserve.http.sse import Event
from llamaserve.store.requests import RequestRow

# The last event of a Responses or Messages stream, by its type.
LAST_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed",
                         "message_stop", "error"})  # fmt: skip
# The events that carry generated output, for the time to first token.
OUTPUT_EVENTS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta",
                           "content_block_delta"})  # fmt: skip


class Meter:
    def __init__(self, row: RequestRow, began: float) -> None:
        self.row = row
        self.began = began  # perf_counter at the request's arrival
        self.ended = False  # the stream ended as its API ends one

    def whole(self, content_type: str, raw: bytes) -> dict[str, Any] | None:
        """Read a whole answer; the JSON object it is, if it is one."""
        if content_type != "application/json":
            return None
        with contextlib.suppress(ValueError):
            answer = json.loads(raw)
            if isinstance(answer, dict):
                self.usage(answer.get("usage"))
                return answer
        return None

    def event(self, event: Event, chunk: dict[str, Any] | None, wants_usage: bool) -> bool:
        """Read one streamed event (`chunk`: its data as JSON); False drops the usage
        chunk the gateway asked for."""
        if event.done:
            self.ended = True
        if chunk is None:
            return True
        kind = chunk.get("type")
        if kind in LAST_EVENTS:
            self.ended = True
        if _is_usage_only(chunk):
            self.usage(chunk["usage"])
            return wants_usage
        if kind in ("response.completed", "response.incomplete"):
            self.usage((chunk.get("response") or {}).get("usage"))
        elif kind == "message_delta":
            self.usage(chunk.get("usage"))
        if self.row.ttft_ms is None and (kind in OUTPUT_EVENTS or _has_output(chunk)):
            self.row.ttft_ms = self.elapsed_ms()
        if isinstance(chunk.get("error"), dict):
            self.row.outcome = "error"
            self.row.error = str(chunk["error"].get("message"))
        return True

    def usage(self, usage: Any) -> None:
        """Tokens from a usage object, in chat's words or in Responses' and Messages'."""
        if not isinstance(usage, dict):
            return
        if "prompt_tokens" in usage:
            self.row.prompt_tokens = usage.get("prompt_tokens")
            self.row.completion_tokens = usage.get("completion_tokens")
        elif "input_tokens" in usage and "output_tokens" in usage:
            cached = usage.get("cache_read_input_tokens") or 0
            self.row.prompt_tokens = usage["input_tokens"] + cached
            self.row.completion_tokens = usage["output_tokens"]

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.began) * 1000


def _is_usage_only(chunk: dict[str, Any]) -> bool:
    """The extra last chunk that `stream_options.include_usage` asks for."""
    return "choices" in chunk and not chunk["choices"] and isinstance(chunk.get("usage"), dict)


def _has_output(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries generated text or a tool call (for time to first token)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
        if delta.get("function_call"):
            return True
    return False
