"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over an
engine's chat completions.

A Messages request becomes a chat request (`to_chat`); the chat stream it is answered
with becomes Anthropic's event stream (`message_start`, `content_block_*`,
`message_delta` with the usage, `message_stop`) or the whole message (`MessageWriter`).
Its errors take Anthropic's envelope (`errors.speaks_anthropic`).

What the engines cannot do is refused (400): images and documents. Fields of
Anthropic's that change nothing here (`metadata`, `thinking`...) are dropped; any other
field is passed to the chat request, as llama-server passes it: llama.cpp's own sampling
parameters (`min_p`, `seed`, `ignore_eos`...) work here too. Where it falls short:
`stop_reason` is `end_turn` when a stop sequence ended the text, as neither engine's
chat stream says which of its stops it met.
"""

from __future__ import annotations

import copy
import json
import secrets
from typing import Any, Literal

from pydantic import Field

from llamaserve.engine.protocol import OpenModel, validate
from llamaserve.errors import InvalidRequest


class Block(OpenModel):
    type: str


class Message(OpenModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(OpenModel):
    name: str
    input_schema: dict[str, Any] | None = None
    description: str | None = None


class ToolChoice(OpenModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class CountTokensRequest(OpenModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = None


def check_messages(body: dict[str, Any]) -> None:
    """A Messages request an engine can run as asked (400 naming the parameter if not)."""
    validate(MessagesRequest, body)
    to_chat(body)


def check_count_tokens(body: dict[str, Any]) -> None:
    validate(CountTokensRequest, body)
    to_chat(body)


# The request's fields that `to_chat` maps, and Anthropic's that have no effect on an engine.
MAPPED = frozenset({"model", "messages", "system", "max_tokens", "stop_sequences", "temperature",
                    "top_p", "top_k", "tools", "tool_choice", "stream", "output_config",
                    "output_format"})  # fmt: skip
DROPPED = frozenset({"metadata", "thinking", "service_tier", "container", "mcp_servers",
                     "context_management", "cache_control", "diagnostics", "inference_geo",
                     "speed", "user_profile_id", "workspace_id"})  # fmt: skip


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request that runs a (checked) Messages request, streamed with usage."""
    messages: list[dict[str, Any]] = []
    if (system := body.get("system")) is not None:
        text = system if isinstance(system, str) else _texts(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    for i, message in enumerate(body["messages"]):
        _add_message(messages, message, f"messages.{i}")
    chat = {name: value for name, value in body.items() if name not in MAPPED | DROPPED}
    chat.update(model=body["model"], messages=messages, stream=True)
    chat["stream_options"] = {"include_usage": True}
    for name, chat_name in (
        ("max_tokens", "max_tokens"),
        ("stop_sequences", "stop"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
    ):
        if body.get(name) is not None:
            chat[chat_name] = body[name]
    output = body.get("output_config")
    fmt = (output.get("format") if isinstance(output, dict) else None) or body.get("output_format")
    if fmt is not None:
        chat["response_format"] = _response_format(fmt)
    if body.get("tools"):
        chat["tools"] = [_chat_tool(tool) for tool in body["tools"]]
    if (choice := body.get("tool_choice")) is not None:
        chat["tool_choice"] = _chat_tool_choice(choice, "tool_choice")
        if choice.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False
    return chat


def _add_message(messages: list[dict[str, Any]], message: dict[str, Any], where: str) -> None:
    content = message["content"]
    if isinstance(content, str):
        messages.append({"role": message["role"], "content": content})
        return
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block["type"]
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and message["role"] == "assistant":
            arguments = json.dumps(block.get("input") or {})
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                place = f"{where}.content.{j}"
                raise InvalidRequest(f"A tool_use block needs an 'id' and a 'name': {place}.",
                                     param=place)  # fmt: skip
            function = {"name": name, "arguments": arguments}
            calls.append({"id": call_id, "type": "function", "function": function})
        elif kind == "tool_result" and message["role"] == "user":
            result = block.get("content", "")
            text = (
                result
                if isinstance(result, str)
                else _texts(result, f"{where}.content.{j}.content")
            )
            if block.get("is_error") is True:
                text = "Error: " + text
            tool_use_id = block.get("tool_use_id")
            if not isinstance(tool_use_id, str):
                place = f"{where}.content.{j}.tool_use_id"
                raise InvalidRequest(f"Missing required parameter: '{place}'.", param=place)
            messages.append({"role": "tool", "tool_call_id": tool_use_id, "content": text})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # a reasoning model's thoughts: not part of what the next turn reads
        else:
            raise InvalidRequest(
                f"This model takes text and tools only: {where}.content.{j} is of type '{kind}'.",
                param=f"{where}.content.{j}.type",
            )
    if texts or calls:
        chat_message: dict[str, Any] = {"role": message["role"], "content": "".join(texts) or None}
        if calls:
            chat_message["tool_calls"] = calls
        elif chat_message["content"] is None:
            chat_message["content"] = ""
        messages.append(chat_message)


def _texts(blocks: Any, where: str) -> str:
    """The text of a list of text blocks (a system prompt, a tool's result)."""
    texts = []
    for j, block in enumerate(blocks):
        if not (isinstance(block, dict) and block.get("type") == "text"
                and isinstance(block.get("text"), str)):  # fmt: skip
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidRequest(f"This model takes text only: {where}.{j} is of type '{kind}'.",
                                 param=f"{where}.{j}")  # fmt: skip
        texts.append(block["text"])
    return "".join(texts)


def _response_format(fmt: Any) -> dict[str, Any]:
    """Anthropic's structured output (`output_config.format`) as chat's `response_format`."""
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"
            and isinstance(fmt.get("schema"), dict)):  # fmt: skip
        raise InvalidRequest(
            "output_config.format must be {'type': 'json_schema', 'schema': {...}}.",
            param="output_config.format",
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: dict[str, Any], where: str) -> str | dict[str, Any]:
    kind = choice["type"]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise InvalidRequest(
                f"Missing required parameter: '{where}.name'.", param=f"{where}.name"
            )
        return {"type": "function", "function": {"name": choice["name"]}}
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use"}  # fmt: skip
Event = tuple[str, dict[str, Any]]  # a named event and its data


class MessageWriter:
    """The Messages answer to one request, built from its chat stream, chunk by chunk:
    the events that stream it (`start`, `chunk`, `finish`) and the whole message
    (`message`), whose usage is the engine's own count."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.id = "msg_" + secrets.token_hex(12)
        self.content: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self._open: int | None = None  # the index of the block being written
        self._calls: dict[int, int] = {}  # chat tool call index -> block index
        self._arguments: dict[int, str] = {}  # block index -> the arguments' JSON so far

    def start(self) -> list[Event]:
        start = self.message()
        start["usage"] = {"input_tokens": 0, "output_tokens": 0}  # known at the end
        return [("message_start", {"type": "message_start", "message": start})]

    def chunk(self, chunk: dict[str, Any]) -> list[Event]:
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
            self.usage = {"input_tokens": usage.get("prompt_tokens", 0),
                          "output_tokens": usage.get("completion_tokens", 0)}  # fmt: skip
        events: list[Event] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._call(call)
            if choice.get("finish_reason") is not None:
                self.stop_reason = STOP_REASONS.get(choice["finish_reason"], "end_turn")
        return events

    def finish(self) -> list[Event]:
        events = self._close()
        for index, arguments in self._arguments.items():
            self.content[index]["input"] = _object(arguments)
        self.stop_reason = self.stop_reason or "end_turn"
        delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
        events.append(
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": self.usage})
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request["model"],
            "content": copy.deepcopy(self.content),
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": dict(self.usage),
        }

    whole = message  # the answer of a request that did not stream

    def _text(self, text: str) -> list[Event]:
        events = []
        if self._open is None or self.content[self._open]["type"] != "text":
            events += self._close()
            events += self._begin({"type": "text", "text": ""})
        assert self._open is not None
        self.content[self._open]["text"] += text
        delta = {"type": "text_delta", "text": text}
        events.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self._open, "delta": delta},
            )
        )
        return events

    def _call(self, call: dict[str, Any]) -> list[Event]:
        events = []
        function = call.get("function") or {}
        index = self._calls.get(call.get("index", 0))
        if index is None:
            events += self._close()
            tool_use_id = "toolu_" + (call.get("id") or secrets.token_hex(12)).removeprefix("call_")
            name = function.get("name") or ""
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": tool_use_id,
                "name": name,
                "input": {},
            }
            events += self._begin(block)
            assert self._open is not None
            index = self._calls[call.get("index", 0)] = self._open
            self._arguments[index] = ""
        if function.get("arguments"):
            self._arguments[index] += function["arguments"]
            delta = {"type": "input_json_delta", "partial_json": function["arguments"]}
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        return events

    def _begin(self, block: dict[str, Any]) -> list[Event]:
        self.content.append(block)
        self._open = len(self.content) - 1
        start = {
            "type": "content_block_start",
            "index": self._open,
            "content_block": copy.deepcopy(block),
        }
        return [("content_block_start", start)]

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]


def _object(arguments: str) -> Any:
    """A tool call's input: its arguments' JSON object (an empty one if they are none)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
