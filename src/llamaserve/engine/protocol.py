"""OpenAI's request models, and the checks every engine applies to a request before it runs.

Both engines refuse the same requests the same way, in OpenAI's words: malformed JSON,
wrong types (strictly: `"stream": "yes"` is no boolean) and values OpenAI refuses are
400 naming the parameter; another model than the served one is 404 `model_not_found`;
what the engines cannot do is refused rather than silently done otherwise: `n` > 1,
several prompts in one request, a prompt's logprobs, images and audio (400), embeddings
(404). `max_tokens` 0 only reads back a completion's prompt (`readback`).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Scope

from llamaserve.bodies import parse_object
from llamaserve.errors import AuthenticationFailed, InvalidRequest, NotFound, api_key
from llamaserve.routes import check_route


class OpenModel(BaseModel):
    """A part of a request: the named fields are checked, strictly (no string for a
    number or a boolean), and any other field passes."""

    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(OpenModel):
    type: Literal["text", "image_url", "input_audio", "file", "refusal"]


class ToolCallFunction(OpenModel):
    name: str
    arguments: str


class ToolCall(OpenModel):
    type: str
    function: ToolCallFunction | None = None


class ChatMessage(OpenModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(OpenModel):
    name: str
    parameters: dict[str, Any] | None = None


class ChatCompletionTool(OpenModel):
    type: str = "function"
    function: FunctionDefinition


class StreamOptions(OpenModel):
    include_usage: bool | None = None


TokenId = Annotated[str, Field(pattern=r"^-?[0-9]+$")]  # a token's id, as JSON keys are


class ResponseFormat(OpenModel):
    type: Literal["text", "json_object", "json_schema"]


class _Sampling(OpenModel):
    """The ranges are OpenAI's; a `max_tokens` below 1 would generate without end on
    llama-server, holding a slot until the context is full (a completion's 0 is no
    generation: see `check_completion`)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[TokenId, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ChatCompletionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: the prompt read back (`readback`)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None


def check_chat(body: dict[str, Any]) -> None:
    """A chat request both engines can run as asked (400 naming the parameter if not)."""
    validate(ChatCompletionRequest, body)
    for i, message in enumerate(body["messages"]):
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if part["type"] in ("image_url", "input_audio", "file"):
                raise InvalidRequest(
                    f"This model takes text only: messages.{i}.content has a part of type "
                    f"'{part['type']}'.",
                    param=f"messages.{i}.content",
                    code="unsupported_content",
                )
        for j, call in enumerate(message.get("tool_calls") or ()):
            _check_call(call, f"messages.{i}.tool_calls.{j}")
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            # OpenAI requires it; llama-server failed on a null one (a 500).
            raise InvalidRequest(
                f"Missing required parameter: 'messages.{i}.tool_call_id'.",
                param=f"messages.{i}.tool_call_id",
            )
        if content is None and not _calls(message):
            raise InvalidRequest(
                f"Missing required parameter: 'messages.{i}.content' (only an assistant "
                "message with tool_calls or function_call may have none).",
                param=f"messages.{i}.content",
            )
    if body.get("tool_choice") not in (None, "none") and not body.get("tools"):
        raise InvalidRequest(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
            "are specified.",
            param="tool_choice",
        )


def _calls(message: dict[str, Any]) -> bool:
    """An assistant message that calls tools or a function, whose content may be null."""
    calls = message.get("tool_calls") or message.get("function_call")
    return message["role"] == "assistant" and bool(calls)


def _check_call(call: dict[str, Any], where: str) -> None:
    """A tool call in a conversation's history is one the engines can render: a function's."""
    if call["type"] != "function":
        raise InvalidRequest(
            f"This server runs function tools only: {where} is of type '{call['type']}'.",
            param=f"{where}.type",
            code="unsupported_tool_call_type",
        )
    if call.get("function") is None:
        raise InvalidRequest(f"Missing required parameter: '{where}.function'.",
                             param=f"{where}.function")  # fmt: skip


def check_completion(body: dict[str, Any]) -> None:
    """A completion request both engines can run as asked (400 naming the parameter if not)."""
    validate(CompletionRequest, body)
    if len(found := prompts(body["prompt"])) != 1:
        raise InvalidRequest(
            "One prompt per request: send a string (or a list of one); "
            f"this request has {len(found)}.",
            param="prompt",
        )
    if body.get("max_tokens") == 0:
        _check_read_back(body)


def _check_read_back(body: dict[str, Any]) -> None:
    """`max_tokens` 0 generates nothing: OpenAI allows it to read back the prompt (`echo`),
    and answers it with the prompt's logprobs when asked, which the engines cannot give."""
    if body.get("echo") is not True:
        raise InvalidRequest(
            "Invalid value for 'max_tokens': it must be at least 1, or 0 with 'echo' true "
            "(the prompt read back, nothing generated).",
            param="max_tokens",
        )
    if body.get("logprobs") is not None:
        raise InvalidRequest(
            "The prompt's logprobs are not available on this server: 'logprobs' cannot be "
            "used with 'max_tokens' 0 and 'echo'.",
            param="logprobs",
            code="unsupported_parameter",
        )


CHECKS = {"/v1/chat/completions": check_chat, "/v1/completions": check_completion}


def prompts(prompt: Any) -> list[Any]:
    """The prompts of a completion request: a string or a list of token ids is one, a
    list of those is each of them."""
    if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], (str, list))):
        return prompt
    return [prompt]


def no_embeddings(model_id: str) -> NotFound:
    """The answer to /v1/embeddings: the engines serve the model for generation only."""
    return NotFound(
        f"The model '{model_id}' is served for chat and completions only, not embeddings.",
        param="model",
        code="model_not_supported",
    )


def check_route_and_key(scope: Scope, key: bytes) -> None:
    """What both engines check first, in OpenAI's order: an OpenAI route (404), its
    method (405), then the key (401); the engines' own other routes are never served."""
    check_route(scope["path"], scope["method"])
    check_key(scope, key)


def check_key(scope: Scope, key: bytes) -> None:
    """The engine's key, from `Authorization: Bearer` or `x-api-key` (401 if not)."""
    headers = dict(scope["headers"])
    token = api_key(headers.get(b"authorization"), headers.get(b"x-api-key"))
    if not hmac.compare_digest(token.encode("latin-1"), key):
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")


def parse_request(raw: bytes, model_id: str) -> dict[str, Any]:
    """The body of a generation request, checked as both engines check it."""
    body = parse_object(raw or b"{}")
    normalise(body)
    if body["model"] != model_id:
        raise _no_such_model(body["model"], model_id)
    body["model"] = model_id  # else an engine names the model by its file path
    return body


def check_request(path: str, raw: bytes) -> tuple[dict[str, Any], bool]:
    """A generation request as the gateway checks it before any engine sees it: the same
    checks as the engines', but for the model it serves (that is the engine's to say).
    Returns the body and whether `normalise` changed it."""
    body = parse_object(raw)
    changed = normalise(body)
    CHECKS[path](body)
    return body, changed


def normalise(body: dict[str, Any]) -> bool:
    """Refuse what no generation route takes, and fold llama.cpp's other names for
    `max_tokens` into it, so that `max_tokens` is the one bound on what a request
    generates; True if the body changed. A parameter given as null is taken as not given,
    as OpenAI takes it (llama_cpp passed a null penalty on to C: a 500)."""
    nulls = [name for name, value in body.items() if value is None]
    for name in nulls:
        del body[name]
    model = body.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str):
        raise InvalidRequest(
            f"Invalid type for 'model': expected a string, but got {_kind(model)} instead.",
            param="model",
        )
    for name in ("n", "n_cmpl"):  # n_cmpl: llama-server's own name for n
        if (body.get(name) or 1) != 1:
            raise InvalidRequest("Only n=1 is supported.", param=name)
    return _fold_lengths(body) or bool(nulls)


# llama-server takes these for `max_tokens`, the last one given winning; llama_cpp
# ignored them. `n_predict` below 0 is llama.cpp's "no bound".
LENGTH_ALIASES = ("max_completion_tokens", "n_predict")


def _fold_lengths(body: dict[str, Any]) -> bool:
    found = [(name, body.pop(name)) for name in LENGTH_ALIASES if name in body]
    bounds = [_length(name, value) for name, value in found]
    bounds = [bound for bound in bounds if bound is not None]
    current = body.get("max_tokens")
    if bounds and (current is None or _is_int(current)):  # another type: refused later
        body["max_tokens"] = min(bounds + ([current] if current is not None else []))
    return bool(found)


def _length(name: str, value: Any) -> int | None:
    """The bound an alias of `max_tokens` sets, if any."""
    if value is None or (name == "n_predict" and _is_int(value) and value < 0):
        return None
    if not _is_int(value):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected an integer, but got {_kind(value)} instead.",
            param=name,
        )
    if value < 1:
        raise InvalidRequest(f"Invalid value for '{name}': it must be at least 1.", param=name)
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def retrieve_model(listing: dict[str, Any], model: str, model_id: str) -> dict[str, Any]:
    """The entry of a `/v1/models` listing for `GET /v1/models/{model}`, or its 404."""
    for entry in listing.get("data", []):
        if isinstance(entry, dict) and entry.get("id") == model:
            return entry
    raise _no_such_model(model, model_id)


def _no_such_model(model: str, model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model}' does not exist; this server serves '{model_id}'.",
        param="model",
        code="model_not_found",
    )


def validate(schema: type[BaseModel], body: dict[str, Any]) -> None:
    """Refuse a malformed request as OpenAI does (400, in its words), where an engine
    would answer 500 or do something else than asked."""
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc.errors(), body) from None


def _refusal(errors: list[Any], body: dict[str, Any]) -> InvalidRequest:
    """The error of the deepest place in the body where validation failed; at a place
    several types would do (`stop`: a string or an array), all of them are named."""
    placed = [(_place(body, error), error) for error in errors]
    place = max((where for where, _ in placed), key=len)
    here = [error for where, error in placed if where == place]
    param = ".".join(str(part) for part in place) or None
    name = param or "body"
    expected = list(dict.fromkeys(_TYPES[e["type"]] for e in here if e["type"] in _TYPES))
    if all(e["type"] in _TYPES for e in here):
        got = _kind(here[0]["input"])
        return InvalidRequest(
            f"Invalid type for '{name}': expected {' or '.join(expected)}, but got {got} instead.",
            param=param,
        )
    message = here[0]["msg"]
    if here[0]["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{name}'.", param=param)
    if here[0]["type"] == "string_pattern_mismatch":  # only token ids have a pattern
        message = "a token id (an integer, as a string) is expected"
    return InvalidRequest(f"Invalid value for '{name}': {message}.", param=param)


def _place(body: Any, error: Any) -> tuple[Any, ...]:
    """The part of a validation error's location that is in the body (pydantic adds the
    members of unions, such as 'list[str]', which are not), with a missing field's name."""
    loc = error["loc"]
    place: list[Any] = []
    value = body
    for part in loc:
        inside = (isinstance(value, dict) and isinstance(part, str) and part in value) or (
            isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        )
        if inside:
            value = value[part]
            place.append(part)
    if error["type"] == "missing" and loc:
        place.append(loc[-1])
    return tuple(place)


_TYPES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def json_schema_of(fmt: dict[str, Any]) -> dict[str, Any]:
    """The schema of a `response_format` of type json_schema (400 when it has none)."""
    schema = (fmt.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON schema object.",
            param="response_format",
        )
    return schema
