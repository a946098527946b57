"""Scenario a: what the gateway adds to a request, against the mock engine.

The same requests go to the mock engine directly (with the engine key) and through a
gateway in front of it (a real user key: authentication, the rate limit and the
request log all on; the limit is too high to trigger). Overhead is gateway minus
direct at the same percentile, for plain completions at concurrency 1 and 32, and
for the time to first token of streams.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from bench import load
from bench.integrity import Ledger
from bench.load import Batch, Client
from bench.stack import Stack, free_port
from bench.stats import latency_summary


@dataclass(frozen=True)
class MockSettings:
    delay_ms: float = 50.0  # until the answer, or the first chunk of a stream
    chunks: int = 16  # chunks of a stream
    chunk_ms: float = 5.0  # between two chunks
    slots: int = 64  # more than the concurrency, so the fair queue holds nothing back


@dataclass(frozen=True)
class Case:
    stream: bool
    concurrency: int
    requests: int
    warmup: int

    @property
    def name(self) -> str:
        return f"{'stream' if self.stream else 'chat'} c={self.concurrency}"


def cases(quick: bool) -> list[Case]:
    scale = 1 if quick else 2.5
    return [
        Case(stream=False, concurrency=1, requests=int(300 * scale), warmup=50),
        Case(stream=False, concurrency=32, requests=int(2000 * scale), warmup=500),
        Case(stream=True, concurrency=1, requests=int(150 * scale), warmup=30),
        Case(stream=True, concurrency=32, requests=int(1000 * scale), warmup=300),
    ]


def run(stack: Stack, mock: MockSettings, quick: bool, ledger: Ledger) -> dict[str, Any]:
    """Start the mock engine and a gateway in front of it, and measure every case."""
    key = stack.create_user("bench-overhead")
    with running_mock(stack, mock) as mock_url, stack.gateway_to(mock_url) as gateway_url:
        batches = load.run(_measure(mock_url, stack.engine_key, gateway_url, key, quick))
    results = []
    for case, direct, gateway in batches:
        ledger.add(f"overhead {case.name} gateway", gateway, gateway=True)
        ledger.add(f"overhead {case.name} direct", direct, gateway=False)
        results.append(_compare(case, direct, gateway))
    ledger.verify(stack)
    return {"mock": asdict(mock), "cases": results}


@contextmanager
def running_mock(stack: Stack, mock: MockSettings) -> Iterator[str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "bench.mock_engine", "--port", str(port),
        "--delay-ms", str(mock.delay_ms), "--chunks", str(mock.chunks),
        "--chunk-ms", str(mock.chunk_ms), "--slots", str(mock.slots),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with stack.process("bench-mock-engine", argv, url + "/health"):
        yield url


async def _measure(
    mock_url: str, engine_key: str, gateway_url: str, user_key: str, quick: bool
) -> list[tuple[Case, Batch, Batch]]:
    done = []
    async with (
        Client(mock_url, engine_key, connections=64, timeout=60) as direct,
        Client(gateway_url, user_key, connections=64, timeout=60) as gateway,
    ):
        for case in cases(quick):
            direct_batch = await _batch(direct, case)
            gateway_batch = await _batch(gateway, case)
            done.append((case, direct_batch, gateway_batch))
    return done


async def _batch(client: Client, case: Case) -> Batch:
    """A warm-up, then the measured requests, at the case's concurrency."""
    body = _body(case.stream)

    async def send(_: int) -> load.Outcome:
        return await client.chat(body, case.stream)

    await load.closed_loop(send, case.concurrency, case.warmup, limit=120)
    return await load.closed_loop(send, case.concurrency, case.requests, limit=300)


def _body(stream: bool) -> bytes:
    payload: dict[str, Any] = {
        "model": "mock",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    }
    if stream:
        payload.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(payload).encode()


def _compare(case: Case, direct: Batch, gateway: Batch) -> dict[str, Any]:
    d, g = latency_summary(direct), latency_summary(gateway)
    return {
        "name": case.name,
        "stream": case.stream,
        "concurrency": case.concurrency,
        "direct": d,
        "gateway": g,
        "overhead_p50_ms": _minus(g["latency_p50_ms"], d["latency_p50_ms"]),
        "overhead_p99_ms": _minus(g["latency_p99_ms"], d["latency_p99_ms"]),
        "ttft_overhead_p50_ms": _minus(g["ttft_p50_ms"], d["ttft_p50_ms"]),
        "ttft_overhead_p99_ms": _minus(g["ttft_p99_ms"], d["ttft_p99_ms"]),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
