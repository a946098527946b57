"""Leases of the per-user cap on requests generating at once, held across gateways.

Each request that generates under the cap holds a row of `llama_generating` until it
ends; `take` adds one only while the user has fewer than the cap, exactly, whichever
gateways the requests came through (see the migration's `llama_take_generating`).
Each gateway keeps its `llama_gateways` row fresh; the leases of one not seen for
`dead_after` seconds (it crashed, or lost the database) are dropped by the others.
Every lease that goes away is announced on the channel `FREED` with its user's id, so
that gateways with that user's requests waiting try again at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

FREED = "llama_generating_freed"

# Each lease that goes away, announced once per user (delivered when the statement commits).
_ANNOUNCE = (
    f"SELECT pg_notify('{FREED}', user_id::text) FROM (SELECT DISTINCT user_id FROM gone) AS u"
)


async def take(pool: Any, *, lease: UUID, user_id: int, gateway: UUID, cap: int) -> bool:
    """Add the lease if the user has fewer than `cap`; False if not."""
    taken: bool = await pool.fetchval(
        "SELECT llama_take_generating($1, $2, $3, $4)", lease, user_id, gateway, cap
    )
    return taken


async def release(pool: Any, leases: Sequence[UUID]) -> None:
    await pool.execute(
        "WITH gone AS (DELETE FROM llama_generating WHERE lease_id = ANY($1::uuid[])"
        f" RETURNING user_id) {_ANNOUNCE}",
        list(leases),
    )


async def alive(pool: Any, gateway: UUID) -> None:
    """Say that the gateway is alive."""
    await pool.execute(
        "INSERT INTO llama_gateways (gateway_id) VALUES ($1)"
        " ON CONFLICT (gateway_id) DO UPDATE SET seen_at = now()",
        gateway,
    )


async def sweep(pool: Any, dead_after: float) -> None:
    """Drop the gateways not seen for `dead_after` seconds, and every lease of a gateway
    that is not alive."""
    await pool.execute(
        f"""WITH dead AS (
                DELETE FROM llama_gateways WHERE seen_at < now() - make_interval(secs => $1)
                RETURNING gateway_id
            ),
            gone AS (
                DELETE FROM llama_generating g
                WHERE g.gateway_id IN (SELECT gateway_id FROM dead)
                   OR NOT EXISTS (SELECT 1 FROM llama_gateways w WHERE w.gateway_id = g.gateway_id)
                RETURNING user_id
            )
            {_ANNOUNCE}""",
        dead_after,
    )


async def leave(pool: Any, gateway: UUID) -> None:
    """A gateway that stops: its leases and its row go."""
    await pool.execute(
        "WITH gone AS (DELETE FROM llama_generating WHERE gateway_id = $1 RETURNING user_id),"
        f" left_ AS (DELETE FROM llama_gateways WHERE gateway_id = $1) {_ANNOUNCE}",
        gateway,
    )
