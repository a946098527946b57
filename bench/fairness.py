"""Scenario c: a heavy user and a light user through the gateway's fair queue.

The heavy user keeps twice the engine's slots in flight, 16 at least (a new one as soon
as one ends), so that half of them wait in the gateway's queue all along; of lengths
that differ as real requests do (`max_tokens` drawn from 64 to 192, seeded): with equal
lengths, or a few (five lengths 32 tokens apart did so at 16 slots), streams that start
together end together, slots free in bursts seconds apart, and a late request waits for
the next burst, however fair the queue. A little later, once the heavy user's backlog
waits in the queue, the light user sends one request (`max_tokens` 128), waits for its
answer and a pause of 0.5 to 2.5 s (random, seeded), and does so `light_requests` times;
then the heavy user stops sending and its streams drain. Queue waits are the gateway's
own (`llama_requests.queue_ms`); times to first token are the client's.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass
from typing import Any

from bench import load
from bench.integrity import Ledger
from bench.load import Batch, Client, Target
from bench.model import TIMEOUT, body
from bench.stack import Stack
from bench.stats import ms, percentile, samples

HEAVY_LIMIT = 300  # requests at most, whatever happens
HEAVY_LENGTHS = (64, 192)  # bounds of the heavy user's max_tokens, drawn anew for each request
SEED = 4


@dataclass(frozen=True)
class Plan:
    heavy_streams: int = 16
    light_requests: int = 8
    light_delay: float = 3.0  # seconds after the heavy user's first requests
    light_pause: tuple[float, float] = (0.5, 2.5)  # seconds between the light user's requests

    @classmethod
    def for_run(cls, quick: bool, slots: int) -> Plan:
        """A heavy user with a backlog as long as the engine's slots: with no more streams
        than slots, nothing of theirs would wait, and a light user's wait for the next
        slot to free would be measured against none."""
        heavy = max(16, 2 * slots)
        return cls(heavy_streams=heavy, light_requests=4 if quick else 8)


def run(
    stack: Stack, heavy: Target, light: Target, plan: Plan, engine: str, ledger: Ledger
) -> dict[str, Any]:
    heavy_batch, light_batch = load.run(_measure(heavy, light, plan))
    ledger.add(f"fairness {engine} heavy", heavy_batch, gateway=True)
    ledger.add(f"fairness {engine} light", light_batch, gateway=True)
    ids = [o.request_id for b in (heavy_batch, light_batch) for o in b.outcomes if o.request_id]
    rows = stack.log_rows(ids)
    result: dict[str, Any] = {
        "engine": engine,
        "plan": asdict(plan),
        "heavy": _user(heavy_batch, rows),
        "light": _user(light_batch, rows),
    }
    heavy_wait, light_wait = result["heavy"]["queue_p50_ms"], result["light"]["queue_p50_ms"]
    result["light_over_heavy_queue_p50"] = (
        light_wait / heavy_wait if heavy_wait and light_wait is not None else None
    )
    return result


async def _measure(heavy: Target, light: Target, plan: Plan) -> tuple[Batch, Batch]:
    stop = asyncio.Event()
    async with (
        Client(heavy.url, heavy.key, connections=plan.heavy_streams, timeout=TIMEOUT) as h,
        Client(light.url, light.key, connections=1, timeout=TIMEOUT) as li,
    ):
        lengths = random.Random(SEED + 1)

        async def send_heavy(i: int) -> load.Outcome:
            length = lengths.randint(*HEAVY_LENGTHS)
            return await h.chat(body(heavy.model, i, length), stream=True)

        heavy_run = asyncio.ensure_future(
            load.closed_loop(send_heavy, plan.heavy_streams, HEAVY_LIMIT, TIMEOUT, stop)
        )
        pauses = random.Random(SEED)
        try:
            await asyncio.sleep(plan.light_delay)
            light_outcomes = []
            for i in range(plan.light_requests):
                light_outcomes.append(await li.chat(body(light.model, i), stream=True))
                await asyncio.sleep(pauses.uniform(*plan.light_pause))
        finally:
            stop.set()
        heavy_batch = await heavy_run
    return heavy_batch, Batch(light_outcomes, sum(o.latency for o in light_outcomes))


def _user(batch: Batch, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    waits = [
        row["queue_ms"]
        for o in batch.outcomes
        if (row := rows.get(o.request_id or "")) and row["queue_ms"] is not None
    ]
    ttfts = [o.ttft for o in batch.outcomes if o.ttft is not None]
    listed = samples(batch)
    for sample, outcome in zip(listed, batch.outcomes, strict=True):
        sample["queue_ms"] = (rows.get(outcome.request_id or "") or {}).get("queue_ms")
    return {
        "requests": len(batch.outcomes),
        "samples": listed,
        "queue_p50_ms": percentile(waits, 50),
        "queue_max_ms": max(waits, default=None),
        "ttft_p50_ms": ms(ttfts, 50),
        "ttft_max_ms": ms(ttfts, 100),
    }
