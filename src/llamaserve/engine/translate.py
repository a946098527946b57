"""What llama-server is asked for a client's request, and how its answer becomes OpenAI's.

The relay always streams from llama-server (a streamed request stops the moment its
client goes away; a plain one runs to the end), so a plain answer is assembled here
from the chunks. On the way:

- a forced call (`tool_choice` naming a function, or the legacy `function_call`) becomes a
  `response_format` json_schema of the function's parameters, and the generated JSON
  comes back as that call's arguments, with finish_reason `tool_calls`/`function_call`;
- other tools stay with llama-server when the model's own template runs (jinja), which
  then handles them; with a named template it would refuse them, so they are dropped,
  as llama-cpp-python's named formats ignore them;
- `json_object` is held to an object (llama-server allows any JSON value);
- chat logprobs keep the number of alternatives asked for (llama-server gives 20 when
  none are asked for), and /v1/completions logprobs take their legacy shape;
- usage leaves every chunk and comes, only when asked for, as a last chunk without choices;
- a chat answer gets the `refusal` OpenAI requires (`answers.with_refusal`).
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from llamaserve.engine.fields import with_refusal
from llamaserve.engine.protocol import json_schema_of, prompts
from llamaserve.engine.tally import Tally
from llamaserve.errors import InvalidRequest

Kind = Literal["chat", "completion"]
HEAD_FIELDS = ("id", "object", "created", "model", "system_fingerprint")
# `prompt_tokens_details.cached_tokens`: the prompt's tokens llama-server took from its cache.
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details")
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call")


@dataclass
class Call:
    """A function call the request forces: the generated JSON is its arguments."""

    name: str
    legacy: bool  # `functions`/`function_call` rather than `tools`/`tool_choice`
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))


class Translator:
    """One request's way to llama-server and back, chunk by chunk."""

    def __init__(self, kind: Kind, body: dict[str, Any]) -> None:
        self.kind = kind
        self.body = body
        self.stream = bool(body.get("stream"))
        options = body.pop("stream_options", None) or {}
        self.include_usage = self.stream and bool(options.get("include_usage"))
        body["stream"] = True
        self.call: Call | None = None
        self.top_logprobs: int | None = None  # alternatives per token the client asked for
        self.offset = 0  # characters before the next token, for legacy logprobs
        self.usage: dict[str, int] | None = None
        self.head: dict[str, Any] = {}
        self._call_opened = False
        # `echo` of a completion (llama-server ignores it): the prompt's text, put before
        # the answer's; the prompt's tokens when its text is still to be asked for.
        self.echo: str | None = None
        self.echo_tokens: list[int] | None = None
        self.tally: Tally | None = None  # the request's tokens, as the gateway may ask

    def count_in(self, tally: Tally) -> None:
        """Count the request's tokens into `tally` as llama-server reports them, token by
        token (its per-token timings: the prompt's tokens, cached and processed, and
        those generated so far)."""
        self.tally = tally
        self.body["timings_per_token"] = True

    def chunk(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk as OpenAI would send it, or None when it has nothing for the client."""
        usage = chunk.pop("usage", None)
        timings = chunk.pop("timings", None)  # llama-server's own, not OpenAI's
        if isinstance(usage, dict):
            self.usage = {key: usage[key] for key in USAGE_FIELDS if key in usage}
        if self.tally is not None:
            _count(self.tally, timings, self.usage)
        if self.kind == "completion" and str(chunk.get("id", "")).startswith("chatcmpl-"):
            chunk["id"] = "cmpl-" + chunk["id"].removeprefix("chatcmpl-")
        self.head = {key: chunk[key] for key in HEAD_FIELDS if key in chunk}
        if not chunk.get("choices"):
            return None
        for choice in chunk["choices"]:
            if self.kind == "chat":
                self._chat_choice(choice)
            else:
                self._completion_choice(choice)
        return chunk

    def usage_chunk(self) -> dict[str, Any] | None:
        """The last chunk `stream_options.include_usage` asks for."""
        if not (self.include_usage and self.usage):
            return None
        return {**self.head, "choices": [], "usage": self.usage}

    def _chat_choice(self, choice: dict[str, Any]) -> None:
        logprobs = with_refusal(choice).get("logprobs")
        if isinstance(logprobs, dict):
            for item in logprobs.get("content") or ():
                _trim(item, self.top_logprobs or 0)
        if self.call is None:
            return
        choice["delta"] = self._call_delta(self.call, choice.get("delta") or {})
        if choice.get("finish_reason") == "stop":
            choice["finish_reason"] = "function_call" if self.call.legacy else "tool_calls"

    def _call_delta(self, call: Call, delta: dict[str, Any]) -> dict[str, Any]:
        text = delta.pop("content", None) or ""
        out: dict[str, Any] = {"role": delta["role"], "content": None} if "role" in delta else {}
        if not self._call_opened:
            self._call_opened = True
            if call.legacy:
                out["function_call"] = {"name": call.name, "arguments": text}
            else:
                function = {"name": call.name, "arguments": text}
                out["tool_calls"] = [
                    {"index": 0, "id": call.id, "type": "function", "function": function}
                ]
        elif text and call.legacy:
            out["function_call"] = {"arguments": text}
        elif text:
            out["tool_calls"] = [{"index": 0, "function": {"arguments": text}}]
        return out

    def _completion_choice(self, choice: dict[str, Any]) -> None:
        if self.echo is not None:  # one choice (n=1): the first text of the answer
            choice["text"] = self.echo + (choice.get("text") or "")
            self.echo = None
        logprobs = choice.get("logprobs")
        if self.top_logprobs is None or not isinstance(logprobs, dict):
            choice["logprobs"] = None
            return
        items = [_trim(item, self.top_logprobs) for item in logprobs.get("content") or []]
        tokens = [str(item.get("token", "")) for item in items]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": [item.get("logprob") for item in items],
            "top_logprobs": [
                {alt["token"]: alt["logprob"] for alt in item["top_logprobs"]} for item in items
            ],
            "text_offset": offsets,
        }


def _trim(item: dict[str, Any], count: int) -> dict[str, Any]:
    """One token's logprobs in OpenAI's shape, with `count` alternatives."""
    item.pop("id", None)
    alternatives = item.get("top_logprobs") or []
    item["top_logprobs"] = alternatives[:count]
    for alternative in item["top_logprobs"]:
        alternative.pop("id", None)
    return item


def _count(tally: Tally, timings: Any, usage: dict[str, int] | None) -> None:
    if usage is not None:
        tally.prompt_tokens = usage.get("prompt_tokens", tally.prompt_tokens)
        tally.completion_tokens = usage.get("completion_tokens", tally.completion_tokens)
    elif isinstance(timings, dict):
        tally.prompt_tokens = int(timings.get("cache_n", 0)) + int(timings.get("prompt_n", 0))
        tally.completion_tokens = int(timings.get("predicted_n", 0))


def chat_translator(body: dict[str, Any], *, native_tools: bool) -> Translator:
    translator = Translator("chat", body)
    body["stream_options"] = {"include_usage": True}
    translator.call = _force_call(body)
    if translator.call is None:
        _drop_unsupported_tools(body, native_tools)
    _hold_json_object(body)
    if body.get("logprobs"):
        translator.top_logprobs = body.get("top_logprobs") or 0
        body["top_logprobs"] = max(translator.top_logprobs, 1)  # 0 would turn logprobs off
    return translator


def completion_translator(body: dict[str, Any]) -> Translator:
    translator = Translator("completion", body)
    requested = body.get("logprobs")
    if isinstance(requested, int) and not isinstance(requested, bool):
        translator.top_logprobs = requested
        body["logprobs"] = max(requested, 1)
    prompt = body.get("prompt")
    translator.offset = len(prompt) if isinstance(prompt, str) else 0
    if body.pop("echo", None) is True:
        [one] = prompts(prompt)  # one: see check_completion
        if isinstance(one, str):
            translator.echo = one
        elif isinstance(one, list):  # token ids: their text is asked of llama-server first
            translator.echo_tokens = one
    return translator


def _force_call(body: dict[str, Any]) -> Call | None:
    """Constrain the answer to a forced call's arguments; None when no call is forced."""
    functions = [tool.get("function") or {} for tool in body.get("tools") or []]
    name, legacy = _forced_name(body.get("tool_choice"), functions), False
    if name is None:
        functions = body.get("functions") or []
        name, legacy = _forced_name(body.get("function_call"), functions), True
    if name is None:
        return None
    function = next((f for f in functions if f.get("name") == name), None)
    if function is None:
        where = ("functions", "function_call") if legacy else ("tools", "tool_choice")
        raise InvalidRequest(f"No function named '{name}' in {where[0]}.", param=where[1])
    for key in TOOL_FIELDS:
        body.pop(key, None)
    schema = function.get("parameters") or {"type": "object"}
    body["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema},
    }
    return Call(name, legacy)


def _forced_name(choice: Any, functions: list[dict[str, Any]]) -> str | None:
    if isinstance(choice, dict):
        name = (choice.get("function") or choice).get("name")
        if not isinstance(name, str):
            raise InvalidRequest("A forced call must name its function.", param="tool_choice")
        return name
    if choice == "required" and len(functions) == 1:
        return str(functions[0].get("name"))
    return None


def _drop_unsupported_tools(body: dict[str, Any], native_tools: bool) -> None:
    body.pop("functions", None)
    body.pop("function_call", None)
    if not native_tools or body.get("tool_choice") == "none":
        body.pop("tools", None)
        body.pop("tool_choice", None)


def _hold_json_object(body: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return
    if fmt.get("type") == "json_schema":
        json_schema_of(fmt)
    elif fmt.get("type") == "json_object" and not fmt.get("schema"):
        body["response_format"] = {"type": "json_object", "schema": {"type": "object"}}


class Assembler:
    """Folds a stream's chunks into the one answer of a request that did not stream."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        self.head = {key: value for key, value in chunk.items() if key != "choices"}
        for choice in chunk["choices"]:
            index = int(choice.get("index") or 0)
            if index not in self.choices:
                self.choices[index] = self._empty(index)
            target = self.choices[index]
            if self.kind == "chat":
                _merge_chat(target, choice)
            else:
                _merge_completion(target, choice)
            target["finish_reason"] = choice.get("finish_reason") or target["finish_reason"]

    def result(self, usage: dict[str, int] | None) -> dict[str, Any]:
        choices = [self.choices[index] for index in sorted(self.choices)]
        for choice in choices if self.kind == "chat" else ():
            message = with_refusal(choice)["message"]
            if message["content"] is None and not {"tool_calls", "function_call"} & set(message):
                message["content"] = ""
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self.head, "object": kind, "choices": choices, "usage": usage}

    def _empty(self, index: int) -> dict[str, Any]:
        if self.kind == "chat":
            message = {"role": "assistant", "content": None}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": None}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}


def _merge_chat(target: dict[str, Any], choice: dict[str, Any]) -> None:
    message = target["message"]
    for key, value in (choice.get("delta") or {}).items():
        if key == "tool_calls":
            _merge_tool_calls(message.setdefault("tool_calls", []), value)
        elif key == "function_call":
            call = message.setdefault("function_call", {"name": "", "arguments": ""})
            call["name"] += value.get("name") or ""
            call["arguments"] += value.get("arguments") or ""
        elif isinstance(value, str) and key != "role":
            message[key] = (message.get(key) or "") + value
        elif value is not None:
            message[key] = value
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        merged = target["logprobs"] = target["logprobs"] or {"content": []}
        merged["content"].extend(logprobs.get("content") or [])


def _merge_tool_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    for delta in deltas:
        index = int(delta.get("index") or 0)
        while len(calls) <= index:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        call = calls[index]
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""


def _merge_completion(target: dict[str, Any], choice: dict[str, Any]) -> None:
    target["text"] += choice.get("text") or ""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return
    if target["logprobs"] is None:
        target["logprobs"] = copy.deepcopy(logprobs)
        return
    for key, values in logprobs.items():
        target["logprobs"][key].extend(values)
