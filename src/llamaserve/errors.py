"""The error family of the HTTP API, and the two functions that render it: OpenAI's
envelope everywhere, Anthropic's on Anthropic's routes (`/v1/messages...`).

                            status  OpenAI type            Anthropic type
APIError
├── InvalidRequest          400  invalid_request_error  invalid_request_error
├── AuthenticationFailed    401  authentication_error   authentication_error
├── PermissionDenied        403  permission_error       permission_error
├── NotFound                404  not_found_error        not_found_error
├── MethodNotAllowed        405  invalid_request_error  invalid_request_error
├── RequestTooLarge         413  invalid_request_error  request_too_large
├── RateLimited             429  rate_limit_error       rate_limit_error
│   └── QuotaExceeded       429  insufficient_quota     rate_limit_error
├── InternalError           500  server_error           api_error
├── UpstreamFailed          502  upstream_error         api_error
├── ServiceUnavailable      503  service_unavailable    overloaded_error
└── UpstreamTimeout         504  timeout_error          api_error
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

# Seconds a client is told to wait (`Retry-After`) before retrying a refusal that says
# nothing more precise: a full queue, an engine or database away, a stop.
RETRY_SOON = 5


def retry_soon() -> dict[str, str]:
    return {"Retry-After": str(RETRY_SOON)}


ANTHROPIC_PREFIX = "/v1/messages"  # Anthropic's Messages API and its count_tokens


def speaks_anthropic(path: str) -> bool:
    """Whether a path is one of Anthropic's routes, whose errors take Anthropic's envelope."""
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


class APIError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    anthropic_type: ClassVar[str] = "api_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self, anthropic: bool = False) -> dict[str, Any]:
        """The error's envelope: OpenAI's, or Anthropic's (which has no param nor code)."""
        if anthropic:
            return anthropic_error_body(self.message, self.anthropic_type)
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    anthropic_type = "authentication_error"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"
    anthropic_type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"
    anthropic_type = "not_found_error"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class RequestTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    anthropic_type = "request_too_large"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"
    anthropic_type = "rate_limit_error"


class QuotaExceeded(RateLimited):
    """A user's token quota used up: OpenAI's 429 `insufficient_quota`."""

    type = "insufficient_quota"


class TokenRateLimited(RateLimited):
    """A user's tokens per minute used up: OpenAI's 429 `rate_limit_exceeded`, as for
    requests (a class of its own for the metrics, which count the two apart)."""


class InternalError(APIError):
    status = 500
    type = "server_error"


class UpstreamFailed(APIError):
    status = 502
    type = "upstream_error"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"
    anthropic_type = "overloaded_error"


def server_stopping() -> ServiceUnavailable:
    """The error of a request still going when a stop's grace is over (gateway or engine)."""
    return ServiceUnavailable(
        "The server is stopping: this request was ended before it finished. Retry it.",
        code="server_stopping",
        headers=retry_soon(),
    )


def api_key(authorization: bytes | None, x_api_key: bytes | None = None) -> str:
    """The key a client sends: in `Authorization: Bearer <key>` as OpenAI's clients send
    it, or in `x-api-key` as Anthropic's do (Bearer first when both come)."""
    if not authorization and x_api_key:
        key = x_api_key.decode("latin-1").strip()
        if key and " " not in key:
            return key
        raise AuthenticationFailed("Malformed x-api-key header.", code="invalid_api_key")
    return bearer_token(authorization)


def bearer_token(authorization: bytes | None) -> str:
    """The key of an `Authorization: Bearer <key>` header, or the gateway's and the
    engines' one refusal of a missing or malformed header."""
    if not authorization:
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer <key>' (or, to Anthropic's "
            "routes, as 'x-api-key: <key>').",
            code="missing_api_key",
        )
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthenticationFailed(
            "Malformed Authorization header: expected 'Bearer <key>'.",
            code="invalid_authorization_header",
        )
    return token


class UpstreamTimeout(APIError):
    status = 504
    type = "timeout_error"


_BY_STATUS: dict[int, type[APIError]] = {
    cls.status: cls
    for cls in (
        InvalidRequest,
        AuthenticationFailed,
        PermissionDenied,
        NotFound,
        MethodNotAllowed,
        RequestTooLarge,
        RateLimited,
        InternalError,
        UpstreamFailed,
        ServiceUnavailable,
        UpstreamTimeout,
    )
}


def error_body(
    message: str, type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope: the only place its shape is written."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def anthropic_error_body(message: str, type: str) -> dict[str, Any]:
    """Anthropic's error envelope: the only place its shape is written."""
    return {"type": "error", "error": {"type": type, "message": message}}


def error_for_status(status: int, message: str, **kwargs: Any) -> APIError:
    """The family member for an HTTP status (422 and unknown 4xx count as bad requests)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else InternalError
    return cls(message, **kwargs)


def openai_error(status: int, raw: bytes) -> APIError | None:
    """The family member for an error body written in another shape (None if already fine).

    FastAPI writes `{"detail": ...}`, with a list of validation errors for a 422;
    llama-server writes an `error` object whose code is the HTTP status, without `param`.
    """
    try:
        body = json.loads(raw)
    except ValueError:
        return error_for_status(status, raw.decode(errors="replace").strip() or "error")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return _mended(status, body["error"])
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = [str(part) for part in first.get("loc", []) if part != "body"]
        param = ".".join(loc) or None
        return InvalidRequest(f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param)
    code = "invalid_api_key" if status == 401 else None
    return error_for_status(status, str(detail), code=code)


def engine_error(status: int, raw: bytes) -> APIError:
    """The family member for an engine's error answer, whatever shape its body has."""
    mended = openai_error(status, raw)
    if mended is not None:
        return mended
    error = json.loads(raw)["error"]  # openai_error found OpenAI's envelope
    return error_for_status(status, error["message"], param=error["param"], code=error["code"])


# llama-server's error types that OpenAI names by a code instead.
_CODES_BY_TYPE = {"exceed_context_size_error": "context_length_exceeded"}


def _mended(status: int, error: dict[str, Any]) -> APIError | None:
    """None for an envelope in OpenAI's shape, else the family member it stands for."""
    code, param = error.get("code"), error.get("param")
    if set(error) == {"message", "type", "param", "code"} and (
        code is None or isinstance(code, str)
    ):
        return None
    if not isinstance(code, str):
        code = _CODES_BY_TYPE.get(str(error.get("type"))) or (
            "invalid_api_key" if status == 401 else None
        )
    return error_for_status(
        status,
        str(error.get("message") or "error"),
        param=param if isinstance(param, str) else None,
        code=code,
    )
