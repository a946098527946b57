"""Each user's service in tokens, for the fair queue: Virtual Token Counters (Sheng et
al., "Fairness in Serving Large Language Models", OSDI'24).

A user's counter is the tokens (prompt and completion, weighed alike) the gateway has
served them. When a slot frees, the waiting user with the least counter is served next
(`Scheduler`). A request is charged when it is granted a slot, an estimate
(`expected_tokens`: its prompt guessed from its size, its completion's bound), so that a
long request does not run free until it ends; when it ends, the estimate is replaced by
the engine's exact counts. A newcomer (nothing waiting or generating) is lifted to the
least counter of the users who are active, so that time spent idle is not banked: no
one can come back with a credit that locks the others out. That counter is taken without
the estimates of requests still generating: what they will really cost is not known yet
(a completion without a bound is guessed), and a newcomer must not wait for the others'
guesses to be corrected down.

Counters are per gateway process, as the queue is; they start afresh when no user is
active.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Literal

from llamaserve.gateway.quotas import ask_of

Fairness = Literal["tokens", "requests"]

# A prompt's tokens guessed from the bytes of its request (its JSON included): English
# text runs about 4 bytes a token; the guess is corrected when the request ends.
BYTES_PER_TOKEN = 4
# A completion without a bound is guessed at this many tokens until it ends.
COMPLETION_GUESS = 256


def expected_tokens(path: str, body: dict[str, Any] | None, size: int) -> int:
    """What a request of `size` bytes is charged when it starts: its prompt guessed from
    its size, and its completion's bound (`max_tokens`, or the API's name for it)."""
    ask = ask_of(path, body) if body is not None else None
    prompt = size // BYTES_PER_TOKEN
    if ask is None:
        return prompt  # it generates nothing
    return prompt + (COMPLETION_GUESS if ask.want is None else ask.want)


class TokenCounters:
    """The tokens served to each user who is active, or owes service (see the module)."""

    def __init__(self) -> None:
        self._counters: dict[Hashable, int] = {}
        self._estimates: dict[Hashable, int] = {}  # charged for requests still generating

    def of(self, user: Hashable) -> int:
        return self._counters.get(user, 0)

    def charge(self, user: Hashable, estimate: int) -> None:
        """Charge a request's estimate as it starts generating."""
        self._counters[user] = self.of(user) + estimate
        self._estimates[user] = self._estimates.get(user, 0) + estimate

    def ended(self, user: Hashable, estimate: int) -> None:
        """A request charged `estimate` has stopped generating (its exact tokens are
        `correct`ed in, before or after)."""
        left = self._estimates.get(user, 0) - estimate
        if left:
            self._estimates[user] = left
        else:
            self._estimates.pop(user, None)

    def correct(self, user: Hashable, tokens: int) -> None:
        """A correction that comes after the user went idle applies only to a debt kept."""
        if user in self._counters:
            self._counters[user] += tokens

    def lift(self, user: Hashable, active: Iterable[Hashable]) -> None:
        """A newcomer starts at no less than the least counter of the active users (their
        estimates in flight left out)."""
        floor = self._floor(active)
        if floor is not None and self.of(user) < floor:
            self._counters[user] = floor

    def forget(self, user: Hashable, active: Iterable[Hashable]) -> None:
        """A user gone idle keeps their counter only while it is above what a newcomer is
        lifted to (a debt they would still owe); with no one active, all start afresh."""
        floor = self._floor(active)
        if floor is None:
            self._counters.clear()
            self._estimates.clear()
        elif self.of(user) <= floor:
            self._counters.pop(user, None)

    def _floor(self, active: Iterable[Hashable]) -> int | None:
        settled = [self.of(u) - self._estimates.get(u, 0) for u in active]
        return min(settled, default=None)
