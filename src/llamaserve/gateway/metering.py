"""What an engine's answer tells of a request, read as it is relayed: its tokens (the
engine's own usage), its time to first token, and an error the stream ended with."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from llamaserve.http.sse import Event
from llamaserve.store.requests import RequestRow


class Meter:
    def __init__(self, row: RequestRow, began: float) -> None:
        self.row = row
        self.began = began  # perf_counter at the request's arrival

    def whole(self, content_type: str, raw: bytes) -> None:
        if content_type == "application/json":
            with contextlib.suppress(ValueError, AttributeError):
                self.usage(json.loads(raw).get("usage"))

    def event(self, event: Event, wants_usage: bool) -> bool:
        """Read one streamed event; False drops the usage chunk the gateway asked for."""
        chunk = event.json()
        if chunk is None:
            return True
        if _is_usage_only(chunk):
            self.usage(chunk["usage"])
            return wants_usage
        if self.row.ttft_ms is None and _has_output(chunk):
            self.row.ttft_ms = self.elapsed_ms()
        if isinstance(chunk.get("error"), dict):
            self.row.outcome = "error"
            self.row.error = str(chunk["error"].get("message"))
        return True

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.row.prompt_tokens = usage.get("prompt_tokens")
            self.row.completion_tokens = usage.get("completion_tokens")

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.began) * 1000


def _is_usage_only(chunk: dict[str, Any]) -> bool:
    """The extra last chunk that `stream_options.include_usage` asks for."""
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


def _has_output(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries generated text or a tool call (for time to first token)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
        if delta.get("function_call"):
            return True
    return False
