"""The routes Llamaserve serves: the same on the engines' fronts and the gateway.

OpenAI's: models, chat completions, completions, embeddings (refused: see `protocol`)
and Responses (`/v1/responses`, and through the gateway its stored responses at
`/v1/responses/{id}`); Anthropic's: Messages (`/v1/messages`) and its token count.
"""

from __future__ import annotations

from llamaserve.errors import MethodNotAllowed, NotFound

OPENAI_ROUTES = {
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
    "/v1/responses": "POST",
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
}
# The routes that generate, by the API they speak.
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{model}: OpenAI's "retrieve model"
RESPONSE_PREFIX = "/v1/responses/"  # GET and DELETE /v1/responses/{id}: a stored response
RESPONSE_METHODS = ("GET", "DELETE")


def method_of(path: str) -> str | tuple[str, ...] | None:
    """The method(s) a route takes, or None for a path that is no route of ours."""
    if model_of(path) is not None:
        return "GET"
    if response_of(path) is not None:
        return RESPONSE_METHODS
    return OPENAI_ROUTES.get(path)


def model_of(path: str) -> str | None:
    """The model id of a `/v1/models/{model}` path (ids may hold slashes), else None."""
    if path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX):
        return path[len(MODEL_PREFIX) :]
    return None


def response_of(path: str) -> str | None:
    """The id of a `/v1/responses/{id}` path (an id holds no slash), else None."""
    if path.startswith(RESPONSE_PREFIX):
        response_id = path[len(RESPONSE_PREFIX) :]
        if response_id and "/" not in response_id:
            return response_id
    return None


def route_of(path: str) -> str:
    """The route a path is, as a metric's label: the route itself, its pattern for one
    with an id in it, `other` for a path that is no route of ours (a client's own
    paths would make a label without bound)."""
    if path in OPENAI_ROUTES:
        return path
    if model_of(path) is not None:
        return MODEL_PREFIX + "{model}"
    if response_of(path) is not None:
        return RESPONSE_PREFIX + "{id}"
    return "other"


def check_route(path: str, method: str) -> None:
    """Refuse a path that is no route of ours (404; never an engine's own, such as /slots)
    or the wrong method for it (405), in the same words everywhere."""
    expected = method_of(path)
    if expected is None:
        raise NotFound(f"Unknown path {path}.", code="unknown_url")
    check_method(path, method, expected)


def check_method(path: str, method: str, expected: str | tuple[str, ...]) -> None:
    """Refuse a method other than the one(s) a route takes (405), naming them in `Allow`
    as HTTP asks of a 405."""
    allowed = (expected,) if isinstance(expected, str) else expected
    if method not in allowed:
        names = ", ".join(allowed)
        raise MethodNotAllowed(
            f"{path} takes {' or '.join(allowed)}, not {method}.", headers={"Allow": names}
        )
