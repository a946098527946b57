"""Scenario a: what the gateway adds to a request, against the mock engine.

The same requests go to the mock engine directly (with the engine key) and through a
gateway in front of it (a real user key: authentication, the rate limit and the
request log all on; the limit is too high to trigger). Overhead is gateway minus
direct at the same percentile, for plain completions at concurrency 1 and 32, and
for the time to first token of streams. With `metered`, the user also has a token quota
and a token rate limit, too large to trigger: each request through the gateway then
costs the reservation before it goes to the engine and the charge after.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from bench import cpu, load, memory
from bench.integrity import Ledger
from bench.load import Batch, Client, Target
from bench.mock_engine import MODEL
from bench.stack import Running, Stack, free_port
from bench.stats import latency_summary

ROUNDS = 5  # alternated rounds per side of each case (see `_measure`)


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
    # Seconds over which the clients start. Spread over one mock delay, they arrive as
    # independent users would; started at once, the fixed delay keeps them in lockstep,
    # and each burst of 32 queues on the gateway's single event loop.
    stagger: float
    # Up to this many seconds (uniformly random) between a client's answer and its next
    # request. With none, clients of equal requests drift into lockstep even when
    # staggered: the variant with pauses tells that queueing from the gateway's own cost.
    pause: float = 0.0

    @property
    def name(self) -> str:
        paused = " paused" if self.pause else ""
        return f"{'stream' if self.stream else 'chat'} c={self.concurrency}{paused}"


def cases(quick: bool, mock: MockSettings) -> list[Case]:
    scale = 1 if quick else 2.5
    spread = mock.delay_ms / 1000
    return [
        Case(stream=False, concurrency=1, requests=int(300 * scale), warmup=50, stagger=0),
        Case(False, concurrency=32, requests=int(2000 * scale), warmup=500, stagger=spread),
        Case(False, 32, int(2000 * scale), warmup=500, stagger=spread, pause=spread / 5),
        Case(stream=True, concurrency=1, requests=int(150 * scale), warmup=30, stagger=0),
        Case(True, concurrency=32, requests=int(1000 * scale), warmup=300, stagger=spread),
    ]


@dataclass
class Measured:
    """One case, directly and through the gateway, with the CPU each used per request."""

    case: Case
    direct: Batch
    gateway: Batch
    direct_cpu: dict[str, float]
    gateway_cpu: dict[str, float]


def run(
    stack: Stack, mock: MockSettings, quick: bool, ledger: Ledger, *, metered: bool = False
) -> dict[str, Any]:
    """Start the mock engine and a gateway in front of it, and measure every case."""
    key = stack.create_user("bench-overhead")
    if metered:
        stack.meter_user("bench-overhead")
    with running_mock(stack, mock) as engine, stack.gateway_to(engine.url) as gateway:
        trees = {"gateway": gateway.pid, "mock engine": engine.pid}
        postgres = stack.postgres_pid()
        if postgres is not None:
            trees["postgres"] = postgres
        meter = cpu.Meter(trees, {"load generator": os.getpid()})
        direct = Target(engine.url, stack.engine_key, MODEL)
        via = Target(gateway.url, key, MODEL)
        census = cpu.Census(stack.pids)
        census.start()
        held = memory.Watch({"gateway": gateway.pid, "mock engine": engine.pid})
        held.start()
        measured = load.run(_measure(direct, via, cases(quick, mock), meter))
        machine = census.result()
        resident = held.result()
    results = []
    for m in measured:
        ledger.add(f"overhead {m.case.name} gateway", m.gateway, gateway=True)
        ledger.add(f"overhead {m.case.name} direct", m.direct, gateway=False)
        results.append(_compare(m))
    ledger.verify(stack)
    return {"mock": asdict(mock), "metered": metered, "cases": results, "machine": machine,
            "memory": resident}  # fmt: skip


@contextmanager
def running_mock(stack: Stack, mock: MockSettings) -> Iterator[Running]:
    port = free_port()
    argv = [
        sys.executable, "-m", "bench.mock_engine", "--port", str(port),
        "--delay-ms", str(mock.delay_ms), "--chunks", str(mock.chunks),
        "--chunk-ms", str(mock.chunk_ms), "--slots", str(mock.slots),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with stack.process("bench-mock-engine", argv, url + "/health") as pid:
        yield Running(url, pid)


async def _measure(
    direct: Target, gateway: Target, plan: list[Case], meter: cpu.Meter
) -> list[Measured]:
    """Each case in ROUNDS alternated rounds, direct then through the gateway: what the
    machine's other work does to either side, over seconds, falls on both. Each round
    starts its clients afresh, so that the lockstep they drift into (see `Case`) is
    drawn anew, ROUNDS times; the rounds of a side are pooled."""
    done = []
    async with (
        Client(direct.url, direct.key, connections=64, timeout=60) as d,
        Client(gateway.url, gateway.key, connections=64, timeout=60) as g,
    ):
        for case in plan:
            await _warm_up(d, case)
            await _warm_up(g, case)
            d_side, g_side = _Side(), _Side()
            for _ in range(ROUNDS):
                await d_side.run(d, case, meter)
                await g_side.run(g, case, meter)
            done.append(Measured(case, d_side.batch, g_side.batch, d_side.cpu, g_side.cpu))
    return done


class _Side:
    """One side's rounds of a case, pooled: their outcomes, and the CPU milliseconds
    each process used per request over all of them."""

    def __init__(self) -> None:
        self.batch = Batch([], 0.0)
        self._cpu_ms: dict[str, float] = {}

    async def run(self, client: Client, case: Case, meter: cpu.Meter) -> None:
        meter.start()
        batch = await _closed_loop(client, case, case.requests // ROUNDS, 300)
        for name, ms in meter.per_request_ms(len(batch.outcomes)).items():
            self._cpu_ms[name] = self._cpu_ms.get(name, 0.0) + ms * len(batch.outcomes)
        self.batch = Batch(self.batch.outcomes + batch.outcomes, self.batch.wall + batch.wall)

    @property
    def cpu(self) -> dict[str, float]:
        requests = max(1, len(self.batch.outcomes))
        return {name: ms / requests for name, ms in self._cpu_ms.items()}


async def _warm_up(client: Client, case: Case) -> None:
    await _closed_loop(client, case, case.warmup, 120)


async def _closed_loop(client: Client, case: Case, requests: int, limit: float) -> Batch:
    body = _body(case.stream)

    async def send(_: int) -> load.Outcome:
        return await client.chat(body, case.stream)

    c, stagger, pause = case.concurrency, case.stagger, case.pause
    return await load.closed_loop(send, c, requests, limit, stagger=stagger, pause=pause)


def _body(stream: bool) -> bytes:
    payload: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    }
    if stream:
        payload.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(payload).encode()


def _compare(m: Measured) -> dict[str, Any]:
    d, g = latency_summary(m.direct), latency_summary(m.gateway)
    return {
        "name": m.case.name,
        "stream": m.case.stream,
        "concurrency": m.case.concurrency,
        "stagger_ms": m.case.stagger * 1000,
        "pause_max_ms": m.case.pause * 1000,
        "direct": {**d, "cpu_ms_per_request": m.direct_cpu},
        "gateway": {**g, "cpu_ms_per_request": m.gateway_cpu},
        "overhead_p50_ms": _minus(g["latency_p50_ms"], d["latency_p50_ms"]),
        "overhead_p95_ms": _minus(g["latency_p95_ms"], d["latency_p95_ms"]),
        "overhead_p99_ms": _minus(g["latency_p99_ms"], d["latency_p99_ms"]),
        "ttft_overhead_p50_ms": _minus(g["ttft_p50_ms"], d["ttft_p50_ms"]),
        "ttft_overhead_p99_ms": _minus(g["ttft_p99_ms"], d["ttft_p99_ms"]),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
