"""llama_cpp's streamed function and tool calls, as OpenAI streams them.

llama_cpp repeats a call's id, type and name in every delta, which clients that join
the deltas (the SDK's stream helper) turn into the name written over and over: OpenAI
sends them in a call's first delta only. And its call deltas carry `role`, `tool_calls`
and `function_call` null, which OpenAI's stream schema does not allow: a delta without
them leaves them out.
"""

from __future__ import annotations

from typing import Any

NOT_NULL = ("role", "tool_calls", "function_call")  # in a delta: given, or left out


class CallDeltas:
    """The call deltas of one stream, mended chunk by chunk."""

    def __init__(self) -> None:
        self._named: set[tuple[int, int | str]] = set()  # (choice, call) whose name went out

    def mend(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            for key in NOT_NULL:
                if key in delta and delta[key] is None:
                    del delta[key]
            self._name_once(choice.get("index", 0), delta)

    def _name_once(self, choice: int, delta: dict[str, Any]) -> None:
        calls = [(call.get("index", 0), call) for call in delta.get("tool_calls") or []]
        if isinstance(delta.get("function_call"), dict):
            calls.append(("function_call", {"function": delta["function_call"]}))
        for index, call in calls:
            if (choice, index) not in self._named:
                self._named.add((choice, index))
                continue
            call.pop("id", None)
            call.pop("type", None)
            if isinstance(call.get("function"), dict):
                call["function"].pop("name", None)
