"""OpenAI's request models, and the checks every engine applies to a request before it runs.

Both engines refuse the same requests the same way: malformed JSON and wrong types are
400, another model than the served one is 404 `model_not_found`, and `n` > 1 is 400
rather than silently answered with one choice.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from llamaserve.errors import AuthenticationFailed, InvalidRequest, NotFound
from llamaserve.routes import check_route


class _Open(BaseModel):
    """A part of a request: the named fields are checked, any other field passes."""

    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: str
    content: str | list[dict[str, Any]] | None = None


class FunctionDefinition(_Open):
    name: str
    parameters: dict[str, Any] | None = None


class ChatCompletionTool(_Open):
    type: str = "function"
    function: FunctionDefinition


class StreamOptions(_Open):
    include_usage: bool | None = None


class _Sampling(_Open):
    """The ranges are OpenAI's; a `max_tokens` below 1 would generate without end on
    llama-server, holding a slot until the context is full."""

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
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[ChatCompletionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)


def check_route_and_key(scope: Scope, key: bytes) -> None:
    """What both engines check first, in OpenAI's order: an OpenAI route (404), its
    method (405), then the key (401); the engines' own other routes are never served."""
    check_route(scope["path"], scope["method"])
    header = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key):
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")


def parse_request(raw: bytes, model_id: str) -> dict[str, Any]:
    """The body of a generation request, checked as both engines check it."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != model_id:
        raise _no_such_model(model, model_id)
    if (body.get("n") or 1) != 1:
        raise InvalidRequest("Only n=1 is supported.", param="n")
    body["model"] = model_id  # else an engine names the model by its file path
    return body


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
    """Refuse a malformed request as OpenAI does (400), where an engine would answer 500."""
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param=param) from None


def json_schema_of(fmt: dict[str, Any]) -> dict[str, Any]:
    """The schema of a `response_format` of type json_schema (400 when it has none)."""
    schema = (fmt.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON schema object.",
            param="response_format",
        )
    return schema


async def send_json(send: Send, payload: Any, status: int = 200) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)
