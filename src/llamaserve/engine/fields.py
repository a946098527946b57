"""The fields of OpenAI's answers that the engines leave out, which both fronts put in:
a chat answer's `refusal` and a model's `created`, which its description requires, and a
model's `owned_by`, the same whichever engine serves it. (Every answer's `x-request-id`
is `http.asgi.RequestIds`.)
"""

from __future__ import annotations

from typing import Any

# A listed model's owner: this server, on both engines (llama-server said "llamacpp",
# llama_cpp "me"), so that a client sees one listing whichever engine runs.
OWNED_BY = "llamaserve"


def with_refusal(choice: dict[str, Any]) -> dict[str, Any]:
    """A chat choice with the `refusal` OpenAI's schema requires, null (these models do
    not refuse through it): in a whole answer's `message` and in a `logprobs` object,
    streamed or not. A stream's `delta` does not require it; a token's entry has none."""
    message = choice.get("message")
    if isinstance(message, dict):
        message.setdefault("refusal", None)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        logprobs.setdefault("refusal", None)
    return choice


def model_list(listing: dict[str, Any], created: int) -> dict[str, Any]:
    """An engine's `/v1/models` as OpenAI's, with `created` the model file's time:
    llama-server says the time of the call, and llama_cpp nothing; and `OWNED_BY`."""
    data = [
        {
            "id": model.get("id"),
            "object": "model",
            "created": created,
            "owned_by": OWNED_BY,
        }
        for model in listing.get("data", [])
        if isinstance(model, dict)
    ]
    return {"object": "list", "data": data}
