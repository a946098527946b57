"""`python -m bench.auth_timing`: whether a refused key tells, by its time, that its key
id exists.

A private stack as `python -m bench` makes it (bootstrap, init-db, one user), the mock
engine and a gateway in front of it. Over one kept-alive connection, requests alternate
between a key whose id does not exist and the user's key id with a wrong secret (each
pair in random order, a fresh id or secret each time); both must get the same 401. It
prints the mean and median of each and their difference, then the same for the
store's query alone (a key id that exists and one that does not) over one connection.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import math
import os
import random
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.overhead import MockSettings, running_mock
from bench.progress import say
from bench.stack import ROOT, BenchError, Stack, guarded
from llamaserve.config import load_settings
from llamaserve.store import db, keys, limits

KINDS = ("unknown id", "known id, wrong secret")
Times = dict[str, list[float]]
VARYING = ("x-request-id", "date")  # headers whose values differ from one answer to the next


@dataclass(frozen=True)
class Refusal:
    """What a client sees of a 401, less its request id."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.auth_timing", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tries", type=int, default=5000, help="per kind (default 5000)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed pairs (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="of the pairs' order (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the stack's directory (logs)")
    args = parser.parse_args(argv)
    if args.tries < 300:
        parser.error("--tries: at least 300, or the difference is lost in the noise")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name in [name for name in os.environ if name.startswith(("LLAMA_", "POSTGRES_"))]:
        del os.environ[name]  # this process reads the stack's settings, as its commands do
    return guarded("bench", lambda: _with_stack(args))


def _with_stack(args: argparse.Namespace) -> int:
    say("setting up a private stack")
    stack = Stack.create({})
    try:
        _run(stack, args)
    finally:
        say("stopping the stack")
        stack.stop()
        if args.keep:
            say(f"kept {stack.base}")
        else:
            shutil.rmtree(stack.base, ignore_errors=True)
    return 0


def _run(stack: Stack, args: argparse.Namespace) -> None:
    key_id = keys.key_id_of(stack.create_user("bench-auth"))
    assert key_id is not None
    rng = random.Random(args.seed)
    with running_mock(stack, MockSettings()) as engine, stack.gateway_to(engine.url) as gateway:
        say(f"{args.tries} refusals of each kind through the gateway, interleaved")
        times = _refusals(gateway.url, key_id, args, rng)
    _report(f"401 through the gateway ({args.tries} each)", times)
    say(f"{args.tries} of each key id through the store's query alone, interleaved")
    _report(f"the key hash query alone ({args.tries} each)", _queries(stack, key_id, args, rng))


def _refusals(url: str, key_id: str, args: argparse.Namespace, rng: random.Random) -> Times:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    seen: dict[str, Refusal] = {}

    def ask(kind: str) -> float:
        key = _key(_unknown_id() if kind == KINDS[0] else key_id)
        began = time.perf_counter()
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        answer = conn.getresponse()
        body = answer.read()
        took = time.perf_counter() - began
        headers = tuple((k, v) for k, v in answer.getheaders() if k.lower() not in VARYING)
        refusal = Refusal(answer.status, headers, body)
        if refusal.status != 401 or seen.setdefault(kind, refusal) != refusal:
            raise BenchError(f"{kind}: expected the same 401 each time, got {refusal}")
        return took

    try:
        _interleave(ask, args.warmup, rng)
        if seen[KINDS[0]] != seen[KINDS[1]]:
            raise BenchError(f"the two refusals differ: {seen[KINDS[0]]} and {seen[KINDS[1]]}")
        return _interleave(ask, args.tries, rng)
    finally:
        conn.close()


def _queries(stack: Stack, key_id: str, args: argparse.Namespace, rng: random.Random) -> Times:
    """The store's key hash query for a missing and an existing key id, alone."""
    settings, layout = load_settings(ROOT, runtime=stack.runtime)
    with asyncio.Runner() as loop:
        conn = loop.run(db.connect(settings, layout))

        async def timed(kind: str) -> float:
            wanted = _unknown_id() if kind == KINDS[0] else key_id
            began = time.perf_counter()
            await limits.key_hash(conn, key_id=wanted)
            return time.perf_counter() - began

        try:
            _interleave(lambda kind: loop.run(timed(kind)), args.warmup, rng)
            return _interleave(lambda kind: loop.run(timed(kind)), args.tries, rng)
        finally:
            loop.run(conn.close())


def _unknown_id() -> str:
    return secrets.token_hex(5)  # one in 2**40 to be the user's


def _key(key_id: str) -> str:
    return f"{keys.PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def _interleave(ask: Callable[[str], float], pairs: int, rng: random.Random) -> Times:
    """Seconds of each kind's tries: `pairs` pairs, each in a random order."""
    times: Times = {kind: [] for kind in KINDS}
    for _ in range(pairs):
        for kind in rng.sample(KINDS, 2):
            times[kind].append(ask(kind))
    return times


def _report(title: str, times: Times) -> None:
    print(title)
    means = {kind: statistics.fmean(t) * 1000 for kind, t in times.items()}
    medians = {kind: statistics.median(t) * 1000 for kind, t in times.items()}
    for kind in KINDS:
        print(f"  {kind:24} mean {means[kind]:.4f} ms   median {medians[kind]:.4f} ms")
    mean_diff = means[KINDS[0]] - means[KINDS[1]]
    median_diff = medians[KINDS[0]] - medians[KINDS[1]]
    # The standard error of the difference of the means: what the noise alone would give.
    noise = math.sqrt(sum(statistics.variance(t) / len(t) for t in times.values())) * 1000
    print(
        f"  {'unknown minus known':24} mean {mean_diff:+.4f} ms (± {noise:.4f})   "
        f"median {median_diff:+.4f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
