"""Scenario b: the real model on one engine, directly and through the gateway.

Streams of fixed prompts (temperature 0, `max_tokens` 128, usage in the stream) at 1,
4, 8 and 16 at once. At 1, direct and gateway requests alternate, so that both see the
same machine; at the others, a closed loop of `rounds x concurrency` requests runs
directly, then through the gateway. Single-stream tok/s is each stream's completion
tokens over its latency; total tok/s is all completion tokens over the wall time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bench import load
from bench.integrity import Ledger
from bench.load import Batch, Client, Target
from bench.stats import samples, stream_summary

MAX_TOKENS = 128
TIMEOUT = 900.0  # seconds for one stream, queueing included
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works, part by part, for a curious ten-year-old.",
    "Describe a walk through a busy market in a coastal town at dawn.",
    "Write a letter from a gardener to the apple tree she planted thirty years ago.",
    "Explain why the sky is blue and sunsets are red, step by step.",
    "Tell the history of a small mountain village over four seasons.",
    "Describe how bread is made, from the wheat field to the bakery shelf.",
    "Write a travel diary entry about a long train journey through the desert.",
)


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...] = (1, 4, 8, 16)
    single: int = 6  # alternating pairs at concurrency 1 (a multiple of 3)
    rounds: int = 2  # requests per level = rounds x concurrency

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        return cls(single=3, rounds=1) if quick else cls()


def body(model: str, i: int, max_tokens: int = MAX_TOKENS) -> bytes:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(payload).encode()


def run(direct: Target, gateway: Target, plan: Plan, engine: str, ledger: Ledger) -> list[Any]:
    """Measure every level; returns one summary per level."""
    levels = load.run(_measure(direct, gateway, plan))
    results = []
    for concurrency, d, g in levels:
        ledger.add(f"{engine} c={concurrency} direct", d, gateway=False)
        ledger.add(f"{engine} c={concurrency} gateway", g, gateway=True)
        results.append(
            {
                "concurrency": concurrency,
                "direct": stream_summary(d),
                "gateway": stream_summary(g),
                "samples": {"direct": samples(d), "gateway": samples(g)},
            }
        )
    return results


async def _measure(direct: Target, gateway: Target, plan: Plan) -> list[tuple[int, Batch, Batch]]:
    top = max(plan.levels)
    async with (
        Client(direct.url, direct.key, connections=top, timeout=TIMEOUT) as d,
        Client(gateway.url, gateway.key, connections=top, timeout=TIMEOUT) as g,
    ):
        warm_up = len(PROMPTS) - 1  # first-request costs; a prompt the first level does not use
        await d.chat(body(direct.model, warm_up), stream=True)
        await g.chat(body(gateway.model, warm_up), stream=True)
        levels = []
        for concurrency in plan.levels:
            if concurrency == 1:
                pair = await _alternating(d, direct.model, g, gateway.model, plan.single)
            else:
                total = plan.rounds * concurrency
                pair = (
                    await _loop(d, direct.model, concurrency, total),
                    await _loop(g, gateway.model, concurrency, total),
                )
            levels.append((concurrency, *pair))
        return levels


async def _alternating(
    d: Client, d_model: str, g: Client, g_model: str, pairs: int
) -> tuple[Batch, Batch]:
    """One stream at a time, direct and gateway in turn; each wall is its streams' time.

    Prompts cycle through three, so that no request follows one with the same prompt
    (whose cached prefix would spare it the prompt's processing), and each path gets
    each of the three once in every three pairs.
    """
    direct, gateway = [], []
    for i in range(pairs):
        direct.append(await d.chat(body(d_model, (2 * i) % 3), stream=True))
        gateway.append(await g.chat(body(g_model, (2 * i + 1) % 3), stream=True))
    return (
        Batch(direct, sum(o.latency for o in direct)),
        Batch(gateway, sum(o.latency for o in gateway)),
    )


async def _loop(client: Client, model: str, concurrency: int, total: int) -> Batch:
    async def send(i: int) -> load.Outcome:
        return await client.chat(body(model, i), stream=True)

    return await load.closed_loop(send, concurrency, total, limit=TIMEOUT)
