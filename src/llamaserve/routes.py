"""The OpenAI routes Llamaserve serves: the same on the engines' fronts and the gateway."""

from __future__ import annotations

from llamaserve.errors import MethodNotAllowed, NotFound

OPENAI_ROUTES = {
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
}
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{model}: OpenAI's "retrieve model"


def method_of(path: str) -> str | None:
    """The method a route takes, or None for a path that is no OpenAI route."""
    return "GET" if model_of(path) is not None else OPENAI_ROUTES.get(path)


def model_of(path: str) -> str | None:
    """The model id of a `/v1/models/{model}` path (ids may hold slashes), else None."""
    if path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX):
        return path[len(MODEL_PREFIX) :]
    return None


def check_route(path: str, method: str) -> None:
    """Refuse a path that is no OpenAI route (404; never an engine's own, such as /slots)
    or the wrong method for it (405), in the same words everywhere."""
    expected = method_of(path)
    if expected is None:
        raise NotFound(f"Unknown path {path}.", code="unknown_url")
    check_method(path, method, expected)


def check_method(path: str, method: str, expected: str) -> None:
    """Refuse a method other than the one a route takes (405), naming that one in `Allow`
    as HTTP asks of a 405."""
    if method != expected:
        raise MethodNotAllowed(
            f"{path} takes {expected}, not {method}.", headers={"Allow": expected}
        )
