"""Percentiles and the summaries of a batch of requests, in milliseconds and tokens/s."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.load import Batch


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of values in seconds, in milliseconds."""
    value = percentile(values, q)
    return None if value is None else value * 1000


def kinds(batch: Batch) -> dict[str, int]:
    counts = {"ok": 0, "error": 0, "cut": 0, "lost": 0}
    for outcome in batch.outcomes:
        counts[outcome.kind] += 1
    return counts


def latency_summary(batch: Batch) -> dict[str, Any]:
    """Latency p50/p95/p99 and requests per second of the finished requests."""
    done = [o for o in batch.outcomes if o.kind == "ok"]
    latencies = [o.latency for o in done]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    return {
        "requests": len(batch.outcomes),
        **kinds(batch),
        "latency_p50_ms": ms(latencies, 50),
        "latency_p95_ms": ms(latencies, 95),
        "latency_p99_ms": ms(latencies, 99),
        "ttft_p50_ms": ms(ttfts, 50),
        "ttft_p99_ms": ms(ttfts, 99),
        "requests_per_s": len(done) / batch.wall if batch.wall > 0 else None,
    }


def stream_summary(batch: Batch) -> dict[str, Any]:
    """Tokens per second (each stream's, and all together), TTFT and inter-token latency."""
    done = [o for o in batch.outcomes if o.kind == "ok"]
    rates = [r for o in done if (r := o.tokens_per_second) is not None]
    gaps = [gap for o in done for gap in o.gaps]
    tokens = sum(o.completion_tokens or 0 for o in done)
    return {
        "requests": len(batch.outcomes),
        **kinds(batch),
        "completion_tokens": tokens,
        "wall_s": batch.wall,
        "total_tok_s": tokens / batch.wall if batch.wall > 0 else None,
        "stream_tok_s_p50": percentile(rates, 50),
        "ttft_p50_ms": ms([o.ttft for o in done if o.ttft is not None], 50),
        "ttft_p99_ms": ms([o.ttft for o in done if o.ttft is not None], 99),
        "itl_p50_ms": ms(gaps, 50),
        "itl_p99_ms": ms(gaps, 99),
    }


def samples(batch: Batch) -> list[dict[str, Any]]:
    """Each request of a batch, for a closer look: when it was sent (s after the first),
    its time to first token and latency (ms), tokens and outcome."""
    first = min((o.started for o in batch.outcomes), default=0.0)
    return [
        {
            "sent_s": round(o.started - first, 3),
            "ttft_ms": None if o.ttft is None else round(o.ttft * 1000, 1),
            "latency_ms": round(o.latency * 1000, 1),
            "tokens": o.completion_tokens,
            "kind": o.kind,
        }
        for o in batch.outcomes
    ]
