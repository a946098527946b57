"""Room in llama-server's KV pool: a request goes to llama-server only once the pool has
room for the most it may take, so that a full pool makes requests wait, never fails them.

llama-server's slots share one pool (`engine/sizing.py`), smaller than the slots' contexts
together. When its requests outgrow the pool, llama-server drops idle slots' caches first,
then, with nothing left to drop, ends every request in progress with "Context size has been
exceeded". So each request holds, from before it is sent until its answer ends, room for
its prompt and everything it may generate: `need`. Requests wait in order of arrival: a
large one is never passed over for ever by smaller ones behind it. The engine's log says
when requests begin to wait, and, once none waits, how many did and for how long.

A prompt's tokens are not known before llama-server reads it; its bound is the bytes of
the body sent, plus TEMPLATE_TOKENS. A token of the tokenizers llama.cpp runs is at least
one byte of text, and the JSON around the messages outweighs what a chat template adds
but for a few tokens (the BOS, a default system prompt): the bound is loose, never short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

log = logging.getLogger("llamaserve.engine")

# Tokens a chat template may add beyond the body's own bytes.
TEMPLATE_TOKENS = 256


class Room:
    def __init__(self, pool: int, per_request: int) -> None:
        self.pool = pool  # tokens of KV cache the slots share
        self.per_request = per_request  # the most one request may use (its context)
        self.used = 0  # held by requests sent, until their answers end
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._waited = 0  # requests that waited since the line formed
        self._line_since = 0.0  # when it formed

    def need(self, body_bytes: int, max_tokens: int | None) -> int:
        """The most a request may take: its prompt's bound and what it may generate,
        within its context (llama-server ends it there)."""
        generated = max_tokens if max_tokens else self.per_request
        return min(self.per_request, body_bytes + TEMPLATE_TOKENS + generated)

    @contextlib.asynccontextmanager
    async def held(self, need: int) -> AsyncIterator[None]:
        """`need` tokens of the pool, waited for in order of arrival, until the block ends."""
        await self._take(need)
        try:
            yield
        finally:
            self.used -= need
            self._wake()

    async def _take(self, need: int) -> None:
        if not self._waiting and self.used + need <= self.pool:
            self.used += need
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (need, turn)
        if not self._waiting:
            self._line_since = time.monotonic()
            log.warning(
                "the KV pool is full (%d of %d tokens held): requests wait for room "
                "(LLAMA_KV_POOL sets its size)", self.used, self.pool,
            )  # fmt: skip
        self._waiting.append(entry)
        self._waited += 1
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.used -= need  # granted as it was cancelled: give it back
            else:
                self._waiting.remove(entry)
            self._wake()
            raise

    def _wake(self) -> None:
        """Grant the requests at the head of the line, in order, while they fit."""
        while self._waiting and self.used + self._waiting[0][0] <= self.pool:
            need, turn = self._waiting.popleft()
            self.used += need
            turn.set_result(None)
        if not self._waiting and self._waited:
            log.warning(
                "the KV pool has room again: %d requests waited for it over %.1f s",
                self._waited, time.monotonic() - self._line_since,
            )  # fmt: skip
            self._waited = 0
