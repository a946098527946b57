"""Server-sent events: the one place they are cut, read and written.

Both engines stream their answers as events whose `data:` is a JSON chunk: chat and
completions streams end with `data: [DONE]`, and llama-server may instead end a failed
one with an `error:` field; the Responses and Messages streams name their events
(`event: response.completed`), whose data carries the same name as its `type`, and end
with their last named event (`response.completed`, `message_stop`, `error`).
The gateway passes events on as they came (it only reads them), the llama-server front
reads them and writes its own; everyone writes with `event` and `error_events`.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llamaserve.errors import APIError

CONTENT_TYPE = b"text/event-stream"
DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class EventSplitter:
    """Cuts a byte stream into whole events (each with its blank line), each passed on as
    soon as it is complete."""

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


@dataclass(frozen=True)
class Event:
    """One event's fields: its `data` lines joined, and llama-server's `error` field.
    Both None for an event of comments only (a ping)."""

    data: bytes | None
    error: bytes | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Event:
        data: list[bytes] = []
        error: bytes | None = None
        for line in raw.splitlines():
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(value)
            elif name == b"error":
                error = value
        return cls(b"\n".join(data) if data else None, error)

    @property
    def done(self) -> bool:
        return self.data is not None and self.data.strip() == DONE

    def json(self) -> dict[str, Any] | None:
        """The data as a JSON object (None for [DONE], pings, or anything else)."""
        if self.data is None or self.done:
            return None
        try:
            chunk = json.loads(self.data)
        except ValueError:
            return None
        return chunk if isinstance(chunk, dict) else None


async def events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, Event]]:
    """Each whole event of a byte stream, as it came and parsed; what is left unended
    when the stream ends is dropped (a stream that ends there is incomplete)."""
    splitter = EventSplitter()
    async for chunk in chunks:
        for raw in splitter.feed(chunk):
            yield raw, Event.parse(raw)


def event(payload: dict[str, Any], name: str | None = None) -> bytes:
    """An event carrying a JSON chunk, named (`event: <name>`) as the Responses and
    Messages streams name theirs."""
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    return head + b"data: " + json.dumps(payload).encode() + b"\n\n"


def error_events(error: APIError, *, anthropic: bool = False) -> bytes:
    """The end of a stream that failed after it started: the error as the last event, in
    OpenAI's envelope then [DONE], or as Anthropic's `error` event."""
    if anthropic:
        return event(error.body(anthropic=True), "error")
    return event(error.body()) + DONE_EVENT
