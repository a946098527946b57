"""What an engine generated for a request, kept for the gateway to read once the request
has ended, however it ended: its client gone mid-stream or before a whole answer came,
an error, a stop.

The gateway names each request it sends (`x-llamaserve-tally: <its request id>`); the
engine's front counts that request's tokens as the engine reports them (llama-server's
per-token timings, the llama-cpp-python hook that counts every token it generates) and
keeps the count a while after the request ends. A request that ends without its usage
reaching the gateway (a client that went away takes the answer's end with it) is then
counted from here: `GET /llamaserve/tally/<id>`, with the engine's key, answers
`{"prompt_tokens", "completion_tokens", "ended"}`. Not an estimate: the engine's own
count of what it processed and generated, up to where it stopped.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import Scope, Send

from llamaserve.errors import NotFound
from llamaserve.http.answer import send_json

HEADER = b"x-llamaserve-tally"
PREFIX = "/llamaserve/tally/"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KEPT = 4096  # tallies kept: far more than requests end between a cut and its reading


@dataclass
class Tally:
    """One request's tokens so far, as the engine counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ended: bool = False
    # Its client went away: generate no more (read by llama-cpp-python's generation hook,
    # whose answer runs in a thread that nothing else can stop).
    stopped: bool = False

    def as_dict(self) -> dict[str, int]:
        """The tokens as OpenAI's usage says them."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Tallies:
    """The tallies of the latest requests the gateway named, oldest forgotten first."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._by_id: OrderedDict[str, Tally] = OrderedDict()

    def open(self, scope: Scope, tally: Tally | None = None) -> Tally:
        """The tally of a request (a new one, or `tally`, which the engine fills); kept
        under the gateway's name for it, if it has one."""
        tally = tally if tally is not None else Tally()
        name = name_of(scope)
        if name is not None:
            self._by_id[name] = tally
            self._by_id.move_to_end(name)
            while len(self._by_id) > self._kept:
                self._by_id.popitem(last=False)
        return tally

    async def answer(self, path: str, send: Send) -> None:
        """`GET /llamaserve/tally/<id>` (the key is checked before)."""
        tally = self._by_id.get(path.removeprefix(PREFIX))
        if tally is None:
            raise NotFound("No tally for this request: it never came here, or is forgotten.")
        await send_json(send, {**tally.as_dict(), "ended": tally.ended})


def name_of(scope: Scope) -> str | None:
    for header, value in scope.get("headers", ()):
        if header == HEADER:
            name = value.decode("latin-1")
            return name if _ID.match(name) else None
    return None
