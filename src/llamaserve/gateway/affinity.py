"""Prefix-affine routing: the engine that most likely holds a request's prompt cached.

llama-server keeps the prompts it processed (in its slots, and in its host-memory prompt
cache, `--cache-ram`) and computes only what follows a request's longest cached prefix.
A conversation resends its whole history every turn, so turn N starts fast only on the
engine where turn N-1 ran. The gateway cannot see the engines' caches; it remembers
where it sent what instead. A request's conversation is cut in units (what its template
renders first: tools, a system prompt, instructions; then each message or input item; a
plain prompt in blocks of characters), hashed cumulatively, and each prefix's hash is
remembered with the engine the request went to (`PrefixMap`, bounded, the least recently
used forgotten first). A request prefers the engine of its longest remembered prefix,
when that prefix is at least half of its conversation: a new conversation that shares
only a system prompt with others goes where the load says (`Scheduler`: the preferred
engine unless it has no free slot, or another has BALANCE_SLOTS more free; then the one
with the most free slots).

Limits: the map is per gateway (several gateways each learn their own, and may send one
conversation's turns to different engines); it cannot know that an engine restarted or
evicted a prompt from its cache (a wrong guess costs what least-loaded routing costs:
the prompt computed again).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llamaserve.gateway.scheduling import EngineState

ENTRIES = 65_536  # prefixes remembered (16-byte hashes): a few MiB at most
MIN_SHARE = 0.5  # of a request's conversation a remembered prefix must cover to count
BLOCK_CHARS = 512  # a plain prompt's unit (characters, or token ids / 4)
# What each API's template renders before the conversation, and where the conversation is.
HEADERS = {
    "/v1/chat/completions": ("tools", "functions"),
    "/v1/responses": ("instructions", "tools"),
    "/v1/messages": ("system", "tools"),
}
CONVERSATIONS = {
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/messages": "messages",
}


@dataclass(frozen=True)
class Prefixes:
    """A request's conversation, prefix by prefix: the hash of each, and its size (the
    bytes of its units, a stand-in for its tokens)."""

    digests: tuple[bytes, ...]
    sizes: tuple[int, ...]


def prefixes_of(path: str, body: dict[str, Any]) -> Prefixes | None:
    """The prefixes of a generating request's conversation; None for a request that has
    none (an embedding, a batch of prompts)."""
    units = list(_units(path, body))
    if not units:
        return None
    digests, sizes = [], []
    digest, size = b"", 0
    for unit in units:
        raw = json.dumps(unit, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.blake2b(digest + raw, digest_size=16).digest()
        size += len(raw)
        digests.append(digest)
        sizes.append(size)
    return Prefixes(tuple(digests), tuple(sizes))


def _units(path: str, body: dict[str, Any]) -> Iterator[Any]:
    if path == "/v1/completions":
        yield from _blocks(body.get("prompt"))
        return
    conversation = CONVERSATIONS.get(path)
    if conversation is None:
        return
    yield [body.get(name) for name in HEADERS[path]]
    items = body.get(conversation)
    if isinstance(items, list):
        yield from items
    elif items is not None:
        yield items


def _blocks(prompt: Any) -> Iterator[Any]:
    """A completion's one prompt in blocks (text, or token ids)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        yield from (prompt[i : i + BLOCK_CHARS] for i in range(0, len(prompt), BLOCK_CHARS))
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        step = BLOCK_CHARS // 4
        yield from (prompt[i : i + step] for i in range(0, len(prompt), step))


class PrefixMap:
    """Prefix hashes -> the engine the last request with that prefix went to."""

    def __init__(self, entries: int = ENTRIES) -> None:
        self.entries = entries
        self._engines: OrderedDict[bytes, EngineState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._engines)

    def holder(self, prefixes: Prefixes) -> EngineState | None:
        """The engine of the longest remembered prefix that covers at least MIN_SHARE of
        the conversation, if any."""
        total = prefixes.sizes[-1]
        for digest, size in zip(reversed(prefixes.digests), reversed(prefixes.sizes), strict=True):
            if size < total * MIN_SHARE:
                return None
            engine = self._engines.get(digest)
            if engine is not None:
                self._engines.move_to_end(digest)
                return engine
        return None

    def remember(self, prefixes: Prefixes, engine: EngineState) -> None:
        """The request went to `engine`: each of its prefixes is there now."""
        engines = self._engines
        for digest in prefixes.digests:
            engines[digest] = engine
            engines.move_to_end(digest)
        while len(engines) > self.entries:
            engines.popitem(last=False)
