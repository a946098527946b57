"""The error family of the HTTP API, and the one function that renders OpenAI's envelope.

APIError
├── InvalidRequest          400  invalid_request_error
├── AuthenticationFailed    401  authentication_error
├── PermissionDenied        403  permission_error
├── NotFound                404  not_found_error
├── RequestTooLarge         413  invalid_request_error
├── RateLimited             429  rate_limit_error
├── InternalError           500  server_error
├── UpstreamFailed          502  upstream_error
├── ServiceUnavailable      503  service_unavailable
└── UpstreamTimeout         504  timeout_error
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class APIError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

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

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class RequestTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"


class InternalError(APIError):
    status = 500
    type = "server_error"


class UpstreamFailed(APIError):
    status = 502
    type = "upstream_error"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"


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


def error_for_status(status: int, message: str, **kwargs: Any) -> APIError:
    """The family member for an HTTP status (422 and unknown 4xx count as bad requests)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else InternalError
    error = cls(message, **kwargs)
    return error


def sse_error_event(error: APIError) -> bytes:
    """The last event of a stream that failed after it started, followed by [DONE]."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"
