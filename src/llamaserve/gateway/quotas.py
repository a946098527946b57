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
from llamaserve.gateway import db_status
from llamaserve.gateway.admission import Ask, format_duration
from llamaserve.routes import MESSAGES, RESPONSES
from llamaserve.store import quotas
from llamaserve.store.quotas import Charge, Reservation
from llamaserve.store.requests import RequestRow

log = logging.getLogger("llamaserve.gateway")

# How long the first charge of a batch waits for others: under load, requests end every
# few milliseconds, and a statement per request made the charges PostgreSQL's largest
# cost in the benchmark's metered run.
GATHER_SECONDS = 0.005
# While the database does not answer, charges are written again after these many seconds
# (doubling from the first to the second); their reservations hold meanwhile.
RETRY_SECONDS = (0.5, 8.0)

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
    """The charges of ended requests, written together: the first that comes waits
    `gather` seconds for others (while its reservation still holds its completion's
    bound, so that nothing passes the quota meanwhile), and they go in one statement
    (`store.quotas.settle_many`); a user's charges are summed into one update. While the
    database does not answer, they wait and are written when it does."""

    def __init__(
        self,
        pool: Any,
        *,
        default_quota: int,
        default_period: str,
        default_tpm: int,
        gather: float = GATHER_SECONDS,
    ):
        self._pool = pool
        self._default_quota = default_quota
        self._default_period = default_period
        self._default_tpm = default_tpm
        self._gather = gather
        self._pending: list[tuple[Reservation | None, int, int]] = []
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    def settle(self, reservation: Reservation | None, row: RequestRow) -> None:
        """Charge a request's real tokens (in the background: the answer has gone). With
        no reservation (the user became metered while it was on its way, sent ahead of
        its admission), it is charged all the same, to the current period."""
        if row.user_id is None:
            return
        tokens = (row.prompt_tokens or 0) + (row.completion_tokens or 0)
        self._pending.append((reservation, row.user_id, tokens))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="quota charges")

    async def _write(self) -> None:
        try:
            retry = RETRY_SECONDS[0]
            while self._pending:
                await asyncio.sleep(self._gather)
                batch, self._pending = self._pending, []
                if await self._charge(batch):
                    retry = RETRY_SECONDS[0]
                    continue
                self._pending = batch + self._pending  # the database away: again, later
                if self._closing:
                    break
                await asyncio.sleep(retry)
                retry = min(2 * retry, RETRY_SECONDS[1])
        finally:
            self._writer = None

    async def _charge(self, batch: list[tuple[Reservation | None, int, int]]) -> bool:
        """Write a batch of charges; False if the database did not answer (the batch is
        to be written again). One it refuses is logged and dropped: it would fail again."""
        try:
            async with self._pool.acquire() as conn:
                # The period of those that reserved in none, reserving nothing.
                unreserved = [(user, 0) for reservation, user, _ in batch if reservation is None]
                found = iter(await self._periods(conn, unreserved))
                charges = []
                for reservation, user, tokens in batch:
                    period = reservation or next(found)
                    charges.append(Charge(user, period.period_start, period.granted, tokens))
                await quotas.settle_many(conn, charges)
        except Exception as exc:
            if db_status.unreachable(exc):
                db_status.status.failed(exc)
                return False
            lost = ", ".join(f"user {user}: {tokens}" for _, user, tokens in batch)
            log.error("tokens could not be charged (%s): %s", lost, exc)
        return True

    async def _periods(self, conn: Any, asks: list[tuple[int, int]]) -> list[Reservation]:
        if not asks:
            return []
        return await quotas.reserve_many(
            conn, asks=asks, default_quota=self._default_quota,
            default_period=self._default_period, default_tpm=self._default_tpm,
        )  # fmt: skip

    async def close(self) -> None:
        """Write the charges still waiting (once more if the database is away; what it
        then cannot take is said in the log)."""
        self._gather, self._closing = 0.0, True
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=10)
        if self._pending:
            lost = ", ".join(f"user {user}: {tokens}" for _, user, tokens in self._pending)
            log.error("tokens not charged, the database away at shutdown (%s)", lost)


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
