"""OpenAI's Responses API (`POST /v1/responses`) over an engine's chat completions.

A Responses request becomes a chat request (`to_chat`); the chat stream it is answered
with becomes the Responses event stream, or the whole Response object (`ResponseWriter`).
The engine alone keeps nothing: a request naming `previous_response_id` is refused here,
and every answer says `store: false`; the gateway keeps responses and continues them
(`gateway.stored`), sending the engine the whole conversation.

What the engines cannot do is refused, in OpenAI's words (400 naming the parameter):
images and files in the input, tools other than functions (web search, file search...),
and input items other than messages, function calls and their outputs. Fields of
OpenAI's that change nothing here (`reasoning`, `include`, `truncation`...) are dropped;
any other field is passed to the chat request, as llama-server passes it: llama.cpp's
own sampling parameters (`top_k`, `min_p`, `seed`, `ignore_eos`...) work here too.
"""

from __future__ import annotations

import copy
import secrets
import time
from typing import Any, Literal

from pydantic import Field

from llamaserve.engine.protocol import OpenModel, validate
from llamaserve.errors import InvalidRequest

GATEWAY = "the Llamaserve gateway (LLAMA_PROXY_ENABLED=1, port 8001)"


class InputPart(OpenModel):
    type: Literal["input_text", "output_text", "refusal", "input_image", "input_file"]


class InputItem(OpenModel):
    type: str | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None


class TextFormat(OpenModel):
    type: Literal["text", "json_object", "json_schema"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class TextConfig(OpenModel):
    format: TextFormat | None = None


class Tool(OpenModel):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(OpenModel):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    text: TextConfig | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


def check_responses(body: dict[str, Any]) -> None:
    """A Responses request an engine can run as asked (400 naming the parameter if not)."""
    validate(ResponsesRequest, body)
    if body.get("previous_response_id") is not None:
        raise InvalidRequest(
            "'previous_response_id' continues a stored response: responses are stored by "
            f"{GATEWAY}, not by the engine alone.",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    to_chat(body)  # what cannot be converted is refused before anything runs


# The request's fields that `to_chat` maps, and OpenAI's that have no effect on an engine.
MAPPED = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
                    "text", "tools", "tool_choice", "parallel_tool_calls", "stream", "store",
                    "previous_response_id", "metadata"})  # fmt: skip
DROPPED = frozenset({"include", "reasoning", "truncation", "background", "service_tier", "prompt",
                     "prompt_cache_key", "safety_identifier", "top_logprobs", "max_tool_calls",
                     "conversation", "stream_options"})  # fmt: skip


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request that runs a (checked) Responses request, streamed with usage."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for i, item in enumerate(items):
        _add_item(messages, item, f"input.{i}")
    if not messages:
        raise InvalidRequest("'input' must hold at least one message.", param="input")
    chat = {name: value for name, value in body.items() if name not in MAPPED | DROPPED}
    chat.update(model=body["model"], messages=messages, stream=True)
    chat["stream_options"] = {"include_usage": True}
    for name, chat_name in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
    ):
        if body.get(name) is not None:
            chat[chat_name] = body[name]
    if (fmt := (body.get("text") or {}).get("format")) is not None:
        if fmt["type"] == "json_object":
            chat["response_format"] = {"type": "json_object"}
        elif fmt["type"] == "json_schema":
            schema = fmt.get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "text.format.schema must be a JSON schema object.", param="text.format.schema"
                )
            named = {"name": fmt.get("name") or "response", "schema": schema}
            chat["response_format"] = {"type": "json_schema", "json_schema": named}
    if body.get("tools"):
        chat["tools"] = [_chat_tool(tool, f"tools.{i}") for i, tool in enumerate(body["tools"])]
    if (choice := body.get("tool_choice")) is not None:
        chat_choice = _chat_tool_choice(choice)
        # 'auto' or 'none' with no tools is OpenAI's default (its answers echo it): no call.
        if chat.get("tools") or chat_choice not in ("auto", "none"):
            chat["tool_choice"] = chat_choice
    return chat


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        if item.get("role") is None or item.get("content") is None:
            raise InvalidRequest(
                f"A message needs a 'role' and a 'content': {where} lacks one.", param=where
            )
        role = "system" if item["role"] == "developer" else item["role"]
        messages.append({"role": role, "content": _text(item["content"], f"{where}.content")})
    elif kind == "function_call":
        call = {
            "id": _string(item, "call_id", where),
            "type": "function",
            "function": {
                "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where),
            },
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and not last.get("content"):
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _text(output, f"{where}.output")
        messages.append(
            {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text}
        )
    elif kind == "reasoning":
        return  # a reasoning model's thoughts: not part of what the next turn reads
    else:
        raise InvalidRequest(
            f"Input items of type '{kind}' are not supported here: send messages, "
            "function calls and their outputs.",
            param=f"{where}.type",
            code="unsupported_input_item",
        )


def _text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or text parts (OpenAI's input_text,
    output_text, refusal); images and files are refused: the model takes text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"Invalid type for '{where}': expected a string or an array.",
                             param=where)  # fmt: skip
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise InvalidRequest(
                f"This model takes text only: {where}.{j} is of type '{kind}'.",
                param=f"{where}.{j}",
                code="unsupported_content",
            )
    return "".join(texts)


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(
            f"Missing required parameter: '{where}.{name}'.", param=f"{where}.{name}"
        )
    return value


def _chat_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if tool["type"] != "function":
        raise InvalidRequest(
            f"This server runs function tools only: {where} is of type '{tool['type']}'.",
            param=f"{where}.type",
            code="unsupported_tool_type",
        )
    if not tool.get("name"):
        raise InvalidRequest(f"Missing required parameter: '{where}.name'.", param=f"{where}.name")
    function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object"}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest(
                f"Invalid value for 'tool_choice': '{choice}' (expected 'auto', 'none', "
                "'required' or a function).",
                param="tool_choice",
            )
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest(
        "Invalid value for 'tool_choice': this server takes 'auto', 'none', 'required' or "
        "{'type': 'function', 'name': ...}.",
        param="tool_choice",
    )


def _format_run(request: dict[str, Any]) -> dict[str, Any]:
    """The request's text format as it was run: a JSON schema with its name (`to_chat`)."""
    fmt = (request.get("text") or {}).get("format") or {"type": "text"}
    if fmt["type"] == "json_schema":
        return {**fmt, "name": fmt.get("name") or "response"}
    return dict(fmt)


def _tool_run(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as OpenAI echoes it: every field named, null when not given
    (`strict` too: the engine does not enforce it, so it says what was asked)."""
    fields = ("type", "name", "description", "parameters", "strict")
    return {name: tool.get(name) for name in fields}


Event = tuple[str, dict[str, Any]]  # a named event and its data


class ResponseWriter:
    """The Responses answer to one request, built from its chat stream, chunk by chunk:
    the events that stream it (`start`, `chunk`, `finish`) and the whole Response
    (`response`), whose usage is the engine's own count."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.id = "resp_" + secrets.token_hex(24)
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []  # items, finished or not
        self.usage: dict[str, Any] | None = None
        self.status = "in_progress"
        self.incomplete: dict[str, str] | None = None
        self._sequence = 0
        self._text: dict[str, Any] | None = None  # the message being written
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool call index -> item

    def start(self) -> list[Event]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[Event]:
        """The events of one chat chunk (its usage is kept for the end)."""
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            self.usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        events: list[Event] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._call_delta(call)
            if choice.get("finish_reason") == "length":
                self.incomplete = {"reason": "max_output_tokens"}
        return events

    def finish(self) -> list[Event]:
        """The events that close what is open and end the stream."""
        events = self._close_text()
        for index in sorted(self._calls):
            item = self._calls[index]
            where = {"item_id": item["id"], "output_index": self.output.index(item)}
            events.append(
                self._event("response.function_call_arguments.done", **where,
                            name=item["name"], arguments=item["arguments"])
            )  # fmt: skip
            item["status"] = "completed"
            events.append(
                self._event(
                    "response.output_item.done", output_index=where["output_index"], item=item
                )
            )
        self._calls = {}
        self.status = "incomplete" if self.incomplete else "completed"
        name = "response.incomplete" if self.incomplete else "response.completed"
        events.append(self._event(name, response=self.response()))
        return events

    def response(self) -> dict[str, Any]:
        """The Response object as it stands. OpenAI says `"usage": null` until the end
        and `"user": null` when none was given, but its description types both as
        objects and strings that may be absent, not null: absent here, which its SDKs
        read as null."""
        request = self.request
        response = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": None,
            "incomplete_details": self.incomplete,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "model": request["model"],
            "output": copy.deepcopy(self.output),  # a snapshot
            "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": request.get("temperature", 1.0),
            "text": {"format": _format_run(request)},
            "tool_choice": request.get("tool_choice") or "auto",
            "tools": [_tool_run(tool) for tool in request.get("tools") or ()],
            "top_p": request.get("top_p", 1.0),
            "truncation": "disabled",
            "metadata": request.get("metadata") or {},
        }
        if self.usage is not None:
            response["usage"] = self.usage
        if request.get("user") is not None:
            response["user"] = request["user"]
        return response

    whole = response  # the answer of a request that did not stream

    def _event(self, kind: str, /, **data: Any) -> Event:
        event = (kind, {"type": kind, "sequence_number": self._sequence, **data})
        self._sequence += 1
        return event

    def _text_delta(self, text: str) -> list[Event]:
        events = []
        if self._text is None:
            self._text = {
                "id": "msg_" + secrets.token_hex(24),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.output.append(self._text)
            index = len(self.output) - 1
            events.append(
                self._event("response.output_item.added", output_index=index, item=self._text)
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._text["content"].append(part)
            events.append(self._event("response.content_part.added", item_id=self._text["id"],
                                      output_index=index, content_index=0, part=part))  # fmt: skip
        part = self._text["content"][0]
        part["text"] += text
        where = {"item_id": self._text["id"], "output_index": self.output.index(self._text)}
        events.append(self._event("response.output_text.delta", **where, content_index=0,
                                  delta=text, logprobs=[]))  # fmt: skip
        return events

    def _close_text(self) -> list[Event]:
        if self._text is None:
            return []
        item, self._text = self._text, None
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": self.output.index(item), "content_index": 0}
        item["status"] = "completed"
        return [
            self._event("response.output_text.done", **where, text=part["text"], logprobs=[]),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=where["output_index"], item=item),
        ]

    def _call_delta(self, call: dict[str, Any]) -> list[Event]:
        events = self._close_text()  # a call after text: the message is whole
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            call_id = call.get("id") or "call_" + secrets.token_hex(12)
            item = {
                "id": "fc_" + secrets.token_hex(24),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call_id,
                "name": function.get("name") or "",
                "arguments": "",
            }
            self._calls[index] = item
            self.output.append(item)
            events.append(self._event("response.output_item.added",
                                      output_index=len(self.output) - 1, item=item))  # fmt: skip
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=self.output.index(item),
                                      delta=function["arguments"]))  # fmt: skip
        return events
