"""Token quotas and the tokens-per-minute limit, at the gateway (the arithmetic, exact
across gateways, is `store.quotas`).

A request of a user with a quota or a token rate limit is admitted only while the user
has tokens left, and its completion cannot take more than is left: at its admission (in
the same round trip, `Admissions`), the gateway reserves what its completion may use
(`max_tokens`, or the API's name for it, bounded to what is left of the quota: a larger
one is lowered, a missing one set), and when it ends the real count (the row's tokens,
the engine's own, also for a request cut off) is settled. The only overshoot of a quota
is the prompt tokens of requests admitted before it ran out. A user with neither costs
nothing here: the admission already says so (`Admission.metered`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from llamaserve.config import describe_period
from llamaserve.errors import QuotaExceeded, RateLimited, TokenRateLimited
from llamaserve.gateway.admission import Ask, format_duration
from llamaserve.routes import MESSAGES, RESPONSES
from llamaserve.store import quotas
from llamaserve.store.quotas import Reservation
from llamaserve.store.requests import RequestRow

log = logging.getLogger("llamaserve.gateway")

# Each generating route's bound on its completion.
COMPLETION_BOUNDS = {
    "/v1/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens",
    RESPONSES: "max_output_tokens",
    MESSAGES: "max_tokens",
}


def ask_of(path: str, body: dict[str, Any]) -> Ask | None:
    """What a request asks of its user's quota (its body normalised: `max_tokens` the one
    bound of chat and completions); None: it generates nothing."""
    if path not in COMPLETION_BOUNDS:
        return None
    asked = body.get(COMPLETION_BOUNDS[path])
    want = asked if isinstance(asked, int) and not isinstance(asked, bool) else None
    if path == "/v1/completions" and want == 0:
        want = 0  # nothing to generate: a read-back
    return Ask(want)


def bound(path: str, body: dict[str, Any], reservation: Reservation) -> bool:
    """Lower a request's completion bound to what was reserved for it (set it, if it had
    none); True if the body changed."""
    field = COMPLETION_BOUNDS.get(path)
    granted = reservation.granted
    if field is None or granted is None:
        return False
    want = ask_of(path, body)
    if want is None or want.want == 0:
        return False
    if want.want is not None and want.want <= granted:
        return False
    body[field] = granted
    return True


class Quotas:
    def __init__(self, pool: Any, *, default_quota: int, default_period: str, default_tpm: int):
        self._pool = pool
        self._default_quota = default_quota
        self._default_period = default_period
        self._default_tpm = default_tpm
        self._settling: set[asyncio.Task[None]] = set()

    def settle(self, reservation: Reservation | None, row: RequestRow) -> None:
        """Charge a request's real tokens (in the background: the answer has gone). With
        no reservation (the user became metered while it was on its way, sent ahead of
        its admission), it is charged all the same, to the current period."""
        tokens = (row.prompt_tokens or 0) + (row.completion_tokens or 0)
        task = asyncio.create_task(self._settle(reservation, row.user_id, tokens))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(
        self, reservation: Reservation | None, user_id: int | None, tokens: int
    ) -> None:
        if user_id is None:
            return
        try:
            async with self._pool.acquire() as conn:
                if reservation is None:  # the period to charge, reserving nothing
                    reservation = await quotas.reserve(
                        conn,
                        user_id=user_id,
                        want=0,
                        default_quota=self._default_quota,
                        default_period=self._default_period,
                        default_tpm=self._default_tpm,
                    )
                await quotas.settle(conn, user_id=user_id, period_start=reservation.period_start,
                                    granted=reservation.granted, tokens=tokens)  # fmt: skip
        except Exception as exc:
            log.error("the tokens of user %s (%d) could not be charged: %s", user_id, tokens, exc)

    async def close(self) -> None:
        """Wait for the charges still being written."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=10)


def refusal(reservation: Reservation) -> RateLimited:
    retry = max(1, round(reservation.retry_after + 0.5))
    headers = {"Retry-After": str(retry)}
    if reservation.reason == "quota":
        renews = reservation.resets_at.isoformat() if reservation.resets_at else "later"
        return QuotaExceeded(
            f"You exceeded your token quota: {reservation.quota} tokens per "
            f"{describe_period(reservation.period or '')}. It renews at {renews}.",
            code="insufficient_quota",
            headers=headers,
        )
    return TokenRateLimited(
        f"Rate limit reached: {reservation.tpm_limit} tokens per minute. Retry in {retry}s.",
        code="rate_limit_exceeded",
        headers=headers,
    )


def token_headers(reservation: Reservation) -> list[tuple[bytes, bytes]]:
    """OpenAI's headers of the tokens-per-minute limit."""
    if reservation.tpm_limit == 0:
        return []
    return [
        (b"x-ratelimit-limit-tokens", str(reservation.tpm_limit).encode()),
        (b"x-ratelimit-remaining-tokens", str(reservation.tpm_remaining).encode()),
        (b"x-ratelimit-reset-tokens", format_duration(reservation.tpm_reset_seconds).encode()),
    ]
