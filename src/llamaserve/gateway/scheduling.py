"""Fair admission to the engines' slots: a queue per user, served by tokens.

Requests in flight to an engine are capped at its slots. The others wait here, each
user in a queue of their own; when a slot frees, the waiting user who was served the
fewest tokens is served (`fairness.TokenCounters`: a request is charged an estimate
when it starts, its exact tokens when it ends; a newcomer is lifted to the least
counter of the active users); among equals, the one with the fewest requests
generating, then the one served least recently (a user not served yet first). With
`fairness="requests"` the counters are not looked at: the fewest generating, then
round-robin. Either way a newcomer waits only for the next slot to free (or, by
tokens, for the others to be served what it was served more than them), never behind
another user's whole backlog. Optionally,
`reserved` slots are kept for users who have nothing generating, so that a newcomer
starts at once, at the price of those slots for a user alone with a backlog.

The queue is the gateway's own: several gateways in front of the same engines each
cap what *they* send; the engines queue whatever exceeds their slots, first come,
first served. The per-user cap is also held across gateways (`Leases`): a user at it
elsewhere is `block`ed here until a request of theirs ends.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from llamaserve.errors import RateLimited, ServiceUnavailable, retry_soon
from llamaserve.gateway.fairness import Fairness, TokenCounters

# A request leaves its preferred engine (where its prompt is cached) for one with this
# many more free slots: each engine batches its own requests, and a busier one answers
# every request it has more slowly (measured: docs/performance.md, multi-turn).
BALANCE_SLOTS = 2


@dataclass(eq=False)
class EngineState:
    """One engine and what the gateway knows of it."""

    url: str
    capacity: int = 1  # slots: requests it generates at once
    in_flight: int = 0
    healthy: bool = True

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight if self.healthy else 0


@dataclass(frozen=True)
class QueueLimits:
    per_user: int = 0  # requests generating at once per user; 0 = no limit
    queue_size: int = 1000  # waiting, all users
    user_queue_size: int = 100  # waiting, one user
    max_wait: float = 300.0  # seconds
    reserved: int = 0  # free slots kept for users with nothing generating; 0 = none
    fairness: Fairness = "tokens"  # what a user's service counts: tokens, or requests


@dataclass(eq=False)
class _Waiter:
    user: Hashable
    exclude: EngineState | None
    prefer: EngineState | None  # where its prompt is likely cached (`affinity.py`)
    cost: int  # tokens charged when it is granted
    future: asyncio.Future[EngineState] = field(default_factory=lambda: _loop().create_future())


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@dataclass(frozen=True)
class Grant:
    engine: EngineState
    waited: float  # seconds spent queued
    charged: int = 0  # tokens charged to the user: the request's estimate


class Scheduler:
    def __init__(self, engines: list[EngineState], limits: QueueLimits) -> None:
        self.engines = engines
        self.limits = limits
        self._queues: dict[Hashable, deque[_Waiter]] = {}
        self._queued: deque[Hashable] = deque()  # users with requests waiting, in arrival order
        self._running: Counter[Hashable] = Counter()
        # When each user with requests waiting or generating was last served.
        self._served: dict[Hashable, int] = {}
        self._clock = itertools.count()
        self._waiting = 0
        self._blocked: set[Hashable] = set()  # users at their cap through other gateways
        self._counters = TokenCounters()  # tokens served to each user

    async def acquire(
        self,
        user: Hashable,
        exclude: EngineState | None = None,
        *,
        again: bool = False,
        max_wait: float | None = None,
        prefer: EngineState | None = None,
        cost: int = 0,
    ) -> Grant:
        """A slot of an engine (not `exclude`; `prefer`'s while it has one free),
        charging the user `cost` tokens (see `served`). A request that had one and gave it
        back (`again`) waits first in its user's queue; `max_wait` is what is left of the
        queue's timeout."""
        began = time.monotonic()
        if not any(e.healthy for e in self.engines if e is not exclude):
            raise _no_engine()
        if user not in self._running and user not in self._queues:
            self._counters.lift(user, self._active())  # a newcomer banks no idle time
        engine = self._pick(exclude, prefer)
        if not self._queued and engine is not None and self._may_run(user):
            self._take(user, engine, cost)
            return Grant(engine, 0.0, cost)
        waiter = self._enqueue(user, exclude, prefer, cost, again)
        self.dispatch()  # a free slot may be held back only from users at their limit
        wait = self.limits.max_wait if max_wait is None else max(0.0, max_wait)
        # asyncio.wait, not wait_for: a cancel that comes as the slot is granted must end
        # the request (Python 3.11's wait_for returned the slot and swallowed the cancel).
        try:
            granted, _ = await asyncio.wait({waiter.future}, timeout=wait)
        except asyncio.CancelledError:
            self._abandon(waiter)  # the client went away, or the request was refused
            raise
        if not granted:
            self._abandon(waiter)
            raise ServiceUnavailable(
                f"The server is busy: no engine was free within {self.limits.max_wait:.0f}s.",
                code="queue_timeout",
                headers=retry_soon(),
            )
        return Grant(waiter.future.result(), time.monotonic() - began, cost)

    def any_engine(self, exclude: EngineState | None = None) -> EngineState:
        """A healthy engine for a request that takes no slot (such as /v1/models)."""
        healthy = [e for e in self.engines if e.healthy and e is not exclude]
        if not healthy:
            raise _no_engine()
        return max(healthy, key=lambda e: e.free)

    def has_other(self, engine: EngineState) -> bool:
        return any(e.healthy and e is not engine for e in self.engines)

    def served(self, user: Hashable, tokens: int) -> None:
        """Correct the tokens charged to a user: a request's estimate by its exact count
        (`tokens` the difference), before its slot is released if it is known by then."""
        self._counters.correct(user, tokens)

    def release(self, user: Hashable, engine: EngineState, charged: int = 0) -> None:
        """Give back a slot granted with `charged` tokens (`Grant.charged`)."""
        self._counters.ended(user, charged)
        engine.in_flight -= 1
        self._running[user] -= 1
        if self._running[user] <= 0:
            del self._running[user]
            self._forget_if_idle(user)
        self.dispatch()

    def block(self, user: Hashable) -> None:
        """Grant the user nothing until `unblock`: they are at their cap elsewhere."""
        self._blocked.add(user)

    def unblock(self, user: Hashable) -> None:
        if user in self._blocked:
            self._blocked.discard(user)
            self.dispatch()

    def dispatch(self) -> None:
        """Grant free slots to waiting users, the least served first (see the module).
        Call when capacity appears."""
        while self._queued:
            user = self._next_user()
            if user is None or not self._serve_first(user):
                return

    def _next_user(self) -> Hashable | None:
        eligible = [u for u in self._queued if self._may_run(u)]
        if not eligible:
            return None
        # Never served counts as longest ago; arrival order breaks the remaining ties.
        if self.limits.fairness == "requests":
            return min(eligible, key=lambda u: (self._running[u], self._served.get(u, -1)))
        counters = self._counters
        return min(
            eligible, key=lambda u: (counters.of(u), self._running[u], self._served.get(u, -1))
        )

    @property
    def waiting(self) -> int:
        return self._waiting

    def per_user(self) -> dict[Hashable, tuple[int, int]]:
        """Each user with requests here: (waiting, generating)."""
        users = {*self._queues, *self._running}
        return {u: (len(self._queues.get(u, ())), self._running[u]) for u in users}

    def _serve_first(self, user: Hashable) -> bool:
        queue = self._queues[user]
        engine = self._pick(queue[0].exclude, queue[0].prefer)
        if engine is None:
            return False
        waiter = queue.popleft()
        self._waiting -= 1
        if not queue:
            del self._queues[user]
            self._queued.remove(user)
        self._take(user, engine, waiter.cost)
        waiter.future.set_result(engine)
        return True

    def _enqueue(
        self,
        user: Hashable,
        exclude: EngineState | None,
        prefer: EngineState | None,
        cost: int,
        again: bool = False,
    ) -> _Waiter:
        queue = self._queues.get(user)
        if not again:  # one given back keeps its place in line, before the user's others
            if queue is not None and len(queue) >= self.limits.user_queue_size:
                raise RateLimited(
                    f"Too many of your requests are waiting ({len(queue)}); "
                    "retry when some finish.",
                    code="user_queue_full",
                    headers=retry_soon(),
                )
            if self._waiting >= self.limits.queue_size:
                raise ServiceUnavailable(
                    "The server is full: too many requests are waiting.",
                    code="queue_full",
                    headers=retry_soon(),
                )
        waiter = _Waiter(user, exclude, prefer, cost)
        if queue is None:
            queue = self._queues[user] = deque()
            self._queued.append(user)
        if again:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self._waiting += 1
        return waiter

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.future.done() and not waiter.future.cancelled():
            self._counters.correct(waiter.user, -waiter.cost)  # granted as it gave up
            self.release(waiter.user, waiter.future.result(), waiter.cost)
            return
        waiter.future.cancel()
        queue = self._queues.get(waiter.user)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._waiting -= 1
            if not queue:
                del self._queues[waiter.user]
                self._queued.remove(waiter.user)
                self._forget_if_idle(waiter.user)

    def _may_run(self, user: Hashable) -> bool:
        """Under the user's cap; and a user already generating leaves the reserved slots
        to users who are not, so that a newcomer starts at once."""
        running = self._running[user]
        if self.limits.per_user and running >= self.limits.per_user:
            return False
        if user in self._blocked:
            return False
        reserved = self.limits.reserved
        if running == 0 or not reserved:
            return True
        healthy = [e for e in self.engines if e.healthy]
        if sum(e.capacity for e in healthy) <= reserved:
            return True  # too small to keep slots aside
        return sum(e.free for e in healthy) > reserved

    def _pick(
        self, exclude: EngineState | None, prefer: EngineState | None = None
    ) -> EngineState | None:
        """`prefer` while it has a free slot (and is not `exclude`) and no other engine has
        BALANCE_SLOTS more; else the healthy engine with the most free slots: a request
        never waits for its preferred engine while another is free."""
        candidates = [e for e in self.engines if e is not exclude and e.free > 0]
        if not candidates:
            return None
        best = max(candidates, key=lambda e: e.free)
        if prefer in candidates and prefer.free + BALANCE_SLOTS > best.free:
            return prefer
        return best

    def _take(self, user: Hashable, engine: EngineState, cost: int) -> None:
        engine.in_flight += 1
        self._running[user] += 1
        self._served[user] = next(self._clock)
        self._counters.charge(user, cost)

    def _active(self) -> set[Hashable]:
        """The users with requests waiting or generating."""
        return set(self._running) | set(self._queues)

    def _forget_if_idle(self, user: Hashable) -> None:
        """A user with nothing waiting or generating starts afresh next time (keeping a
        debt of tokens, see `TokenCounters.forget`)."""
        if user not in self._running and user not in self._queues:
            self._served.pop(user, None)
            self._counters.forget(user, self._active())


def _no_engine() -> ServiceUnavailable:
    """Every engine is out: probed again every LLAMA_PROXY_HEALTH_INTERVAL seconds."""
    return ServiceUnavailable(
        "No engine is available.", code="engine_unavailable", headers=retry_soon()
    )
