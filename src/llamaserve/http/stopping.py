"""How a server stops with requests in flight (`console.sh stop`, SIGTERM): the one
mechanism of the gateway and both engines.

The server stops taking connections and calls `InFlight.begin(grace)`. The requests in
flight get `grace` seconds; then each still going is cancelled as cut (its `Ticket`),
and its owner ends its answer with `server_stopping()`, not cut silently: 503 if the
answer has not begun, a last error event and `[DONE]` in a stream. Cancelling the task
that reads from an engine closes that request to the engine, which stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from llamaserve.errors import server_stopping, speaks_anthropic
from llamaserve.http.answer import Answer


class Ticket:
    """One tracked task; `cut` once the stop's grace ended it."""

    def __init__(self, task: asyncio.Future[Any]) -> None:
        self.task = task
        self.cut = False


class InFlight:
    """The tasks in flight, and the stop's grace."""

    def __init__(self, log: logging.Logger) -> None:
        self.over = False  # the grace is over: a request that comes now is refused
        self._tickets: set[Ticket] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._log = log

    def __len__(self) -> int:
        return len(self._tickets)

    @contextlib.contextmanager
    def track(self, task: asyncio.Future[Any]) -> Iterator[Ticket]:
        ticket = Ticket(task)
        self._tickets.add(ticket)
        try:
            yield ticket
        finally:
            self._tickets.discard(ticket)

    def begin(self, grace: float) -> None:
        """The stop has begun: what is in flight is cut off `grace` seconds from now."""
        if self._timer is None:
            self._log.warning("stopping: requests in flight get %gs to finish", grace)
            self._timer = asyncio.get_running_loop().call_later(grace, self.cut_off)

    def cut_off(self) -> None:
        self.over = True
        if self._tickets:
            self._log.warning("stopping: ending %d requests still in flight", len(self._tickets))
        for ticket in list(self._tickets):
            ticket.cut = True
            ticket.task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class EndOnStop:
    """ASGI middleware of the engines: each request is tracked, and the one the stop's
    grace ends gets the stop's error (the gateway tracks its relays itself)."""

    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = Answer(send, anthropic=speaks_anthropic(scope["path"]))
        if self.in_flight.over:
            await answer.fail(server_stopping())
            return
        task = asyncio.current_task()
        assert task is not None
        with self.in_flight.track(task) as ticket:
            try:
                await self.app(scope, receive, answer.send)
            except asyncio.CancelledError:
                if not ticket.cut:
                    raise
                task.uncancel()
                await answer.fail(server_stopping())
