"""Server-sent events as the engine writes them: split into events, read for usage."""

from __future__ import annotations

import json
import re
from typing import Any

_EVENT_END = re.compile(rb"\r?\n\r?\n")
DONE = b"[DONE]"


class EventSplitter:
    """Cuts a byte stream into whole events, each passed on as soon as it is complete."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._pending = data[start:]
        return events

    @property
    def pending(self) -> bytes:
        return self._pending


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's `data:` field (None for comments such as pings)."""
    for line in event.splitlines():
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


def parse_chunk(data: bytes) -> dict[str, Any] | None:
    if data == DONE:
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def is_usage_only(chunk: dict[str, Any]) -> bool:
    """The extra last chunk that `stream_options.include_usage` asks for."""
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


def has_output(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries generated text or a tool call (for time to first token)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
        if delta.get("function_call"):
            return True
    return False
