"""The load generator: a keep-alive aiohttp client that times each request as the user
sees it, and a closed loop that keeps N requests in flight.

Times are taken with `time.perf_counter` in the client: latency to the last byte, time
to the first chunk that carries text, and the gaps between text chunks (one token
each on both engines). Completion tokens come from the answer's `usage`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import uvloop

DONE = b"[DONE]"
T = TypeVar("T")


@dataclass
class Outcome:
    """One request as the client saw it."""

    started: float  # perf_counter when it was sent
    status: int = 0  # 0: no answer at all
    latency: float = 0.0  # seconds to the last byte
    ttft: float | None = None  # seconds to the first text (streams)
    gaps: list[float] = field(default_factory=list)  # seconds between text chunks
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    request_id: str | None = None  # the gateway's x-request-id
    error: str | None = None  # a clear error: the server said what went wrong
    cut: str | None = None  # how the answer broke off without a clear error

    @property
    def kind(self) -> str:
        """ok (finished), error (a clear error), cut (broken off), or lost (no answer)."""
        if self.status == 0:
            return "lost"
        if self.cut is not None:
            return "cut"
        if self.error is not None:
            return "error"
        return "ok" if self.finish_reason is not None else "cut"

    @property
    def tokens_per_second(self) -> float | None:
        if not self.completion_tokens or self.latency <= 0:
            return None
        return self.completion_tokens / self.latency


@dataclass(frozen=True)
class Target:
    """Where to send: an engine directly or the gateway, with its key and the model's id."""

    url: str
    key: str
    model: str


@dataclass
class Batch:
    """The outcomes of a closed-loop run and its wall time."""

    outcomes: list[Outcome]
    wall: float  # seconds from the first send to the last answer


class Client:
    """A pooled client of one base URL with one bearer key."""

    def __init__(self, base_url: str, key: str, connections: int, timeout: float) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=self._connections, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def chat(self, body: bytes, stream: bool) -> Outcome:
        """Send one chat completion; never raises for a failed request."""
        assert self._session is not None, "use the client in `async with`"
        outcome = Outcome(started=time.perf_counter())
        try:
            async with self._session.post(self.url, data=body, headers=self.headers) as reply:
                outcome.status = reply.status
                outcome.request_id = reply.headers.get("x-request-id")
                if reply.status >= 400:
                    outcome.error = f"{reply.status}: {_error_text(await reply.read())}"
                elif stream:
                    await _read_stream(reply, outcome)
                else:
                    _read_completion(await reply.read(), outcome)
        except ValueError as exc:  # JSON the client cannot read
            outcome.cut = f"unreadable answer: {exc}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            if outcome.status:
                outcome.cut = f"connection broke: {type(exc).__name__}"
            else:
                outcome.error = f"no answer: {type(exc).__name__}: {exc}"
        outcome.latency = time.perf_counter() - outcome.started
        return outcome


async def _read_stream(reply: aiohttp.ClientResponse, outcome: Outcome) -> None:
    last_text: float | None = None
    done = False
    async for line in reply.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == DONE:
            done = True
            continue
        now = time.perf_counter()
        if _read_chunk(json.loads(data), outcome):
            if last_text is None:
                outcome.ttft = now - outcome.started
            else:
                outcome.gaps.append(now - last_text)
            last_text = now
    if not done and outcome.error is None:
        outcome.cut = "the stream ended without [DONE]"


def _read_chunk(chunk: dict[str, Any], outcome: Outcome) -> bool:
    """Note what a streamed chunk says; True when it carries text."""
    if isinstance(chunk.get("error"), dict):
        outcome.error = f"stream error: {chunk['error'].get('message')}"
        return False
    if isinstance(chunk.get("usage"), dict):
        outcome.completion_tokens = chunk["usage"].get("completion_tokens")
        outcome.prompt_tokens = chunk["usage"].get("prompt_tokens")
    text = False
    for choice in chunk.get("choices") or ():
        text = text or bool((choice.get("delta") or {}).get("content"))
        outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
    return text


def _read_completion(raw: bytes, outcome: Outcome) -> None:
    answer = json.loads(raw)
    choices = answer.get("choices") or [{}]
    outcome.finish_reason = choices[0].get("finish_reason")
    outcome.completion_tokens = (answer.get("usage") or {}).get("completion_tokens")


def _error_text(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace") or "(empty body)"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the load generator on uvloop, the event loop the gateway itself runs on."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def closed_loop(
    send: Callable[[int], Awaitable[Outcome]],
    concurrency: int,
    total: int,
    limit: float,
    stop: asyncio.Event | None = None,
    stagger: float = 0.0,
    pause: float = 0.0,
) -> Batch:
    """Keep `concurrency` requests in flight until `total` were sent, `limit` seconds have
    passed or `stop` is set; request i is `send(i)`. The clients start evenly spread
    over `stagger` seconds, and wait a random 0 to `pause` seconds between requests."""
    counter = itertools.count()
    outcomes: list[Outcome] = []
    began = time.perf_counter()

    def going() -> bool:
        return time.perf_counter() - began < limit and not (stop and stop.is_set())

    async def worker(n: int) -> None:
        await asyncio.sleep(stagger * n / concurrency)
        while (i := next(counter)) < total and going():
            outcomes.append(await send(i))
            if pause:
                await asyncio.sleep(random.uniform(0, pause))

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return Batch(outcomes, time.perf_counter() - began)
