"""Scenario e: fairness by tokens, through the gateway on llama-server at its default size.

Two users keep more streams in flight than the engine has slots (`clients` each, the
slots and 8 more), so both are backlogged all along: the heavy user sends long prompts
(about 300 tokens, each made unique by its first words, so that no cached prefix spares
its processing) with long completions (`max_tokens` 128); the light user short
questions with short answers (`max_tokens` 24). Each policy of the fair queue is
measured in turn, on the same engine: `tokens` (the stack's gateway, the default), then
`requests` (another gateway on the same database, LLAMA_PROXY_FAIRNESS=requests: the
round-robin of requests, as before).

The tokens each user receives (prompt and completion, as the fair queue counts them)
are counted as they stream, from the start (both users start at once) for `window`
seconds: a request's prompt when its first token comes, its completion token by token
(each text chunk is a token). New requests stop at the window's end, and those in flight
are let finish. The count starts with the run, not after a warm-up: the heavy user's first
requests take every slot before the light user's arrive, and the fair queue then gives
the light user the slots until it has caught up; a window that left out the start would
count the catching up without what it makes up for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from bench import load
from bench.integrity import Ledger
from bench.load import Batch, Client, Outcome, Target
from bench.model import PROMPTS, TIMEOUT
from bench.report import grid
from bench.stack import Stack, free_port

HEAVY_TOKENS, LIGHT_TOKENS = 128, 24  # max_tokens
HEAVY_PROMPT = " ".join(PROMPTS) * 2  # about 300 tokens


@dataclass(frozen=True)
class Plan:
    warmup: float = 0.0  # seconds before the window (see the module)
    window: float = 100.0  # seconds counted, per policy
    extra_clients: int = 8  # each user's streams beyond the engine's slots

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        return cls(window=60.0) if quick else cls()


def body(model: str, i: int, heavy: bool) -> bytes:
    """A unique request of either user (its number first: no two share a prefix)."""
    text = HEAVY_PROMPT if heavy else PROMPTS[i % len(PROMPTS)]
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {i}. {text}"}],
        "max_tokens": HEAVY_TOKENS if heavy else LIGHT_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(payload).encode()


def run(
    stack: Stack, heavy: Target, light: Target, slots: int, plan: Plan, ledger: Ledger
) -> dict[str, Any]:
    """Both policies, one after the other; each user's tokens per second and their ratio."""
    clients = slots + plan.extra_clients
    result: dict[str, Any] = {"slots": slots, "clients": clients, "plan": asdict(plan)}
    policies: dict[str, Any] = {}
    for policy in ("tokens", "requests"):
        with _gateway(stack, policy) as url:
            pair = load.run(_measure(
                Target(url, heavy.key, heavy.model), Target(url, light.key, light.model),
                clients, plan,
            ))  # fmt: skip
        for user, batch in zip(("heavy", "light"), pair, strict=True):
            ledger.add(f"token fairness {policy} {user}", batch, gateway=True)
        start, end = plan.warmup, plan.warmup + plan.window
        heavy_got, light_got = (_served(batch, start, end, plan.window) for batch in pair)
        ratio = heavy_got["tok_s"] / light_got["tok_s"] if light_got["tok_s"] else None
        policies[policy] = {"heavy": heavy_got, "light": light_got, "heavy_over_light": ratio}
    result["policies"] = policies
    return result


@contextmanager
def _gateway(stack: Stack, policy: str) -> Iterator[str]:
    """The stack's gateway for the default policy; another, on the same database and
    engine, for the other."""
    if policy == "tokens":
        yield stack.gateway_url
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "llamaserve", "serve-gateway"]
    env = {"LLAMA_PROXY_PORT": str(port), "LLAMA_SERVER_BACKEND_URL": stack.engine_url,
           "LLAMA_PROXY_FAIRNESS": policy}  # fmt: skip
    with stack.process(f"bench-gateway-{policy}", argv, url + "/ready", **env):
        yield url


async def _measure(heavy: Target, light: Target, clients: int, plan: Plan) -> tuple[Batch, Batch]:
    stop = asyncio.Event()
    numbers = itertools.count()  # unique across both users
    async with (
        Client(heavy.url, heavy.key, connections=clients, timeout=TIMEOUT) as h,
        Client(light.url, light.key, connections=clients, timeout=TIMEOUT) as li,
    ):

        async def send_heavy(_: int) -> Outcome:
            return await h.chat(body(heavy.model, next(numbers), heavy=True), stream=True)

        async def send_light(_: int) -> Outcome:
            return await li.chat(body(light.model, next(numbers), heavy=False), stream=True)

        loops = [
            asyncio.ensure_future(load.closed_loop(send, clients, 10**6, TIMEOUT, stop))
            for send in (send_heavy, send_light)
        ]
        try:
            await asyncio.sleep(plan.warmup + plan.window)
        finally:
            stop.set()
        heavy_batch, light_batch = await asyncio.gather(*loops)
    return heavy_batch, light_batch


def _served(batch: Batch, start: float, end: float, window: float) -> dict[str, Any]:
    """The tokens a user received between `start` and `end` seconds after the first
    request of the run (of this user, sent at once with the other's)."""
    first = min((o.started for o in batch.outcomes), default=0.0)
    prompt = completion = 0.0
    for outcome in batch.outcomes:
        if outcome.ttft is None or outcome.kind != "ok":
            continue
        times = list(itertools.accumulate([outcome.ttft, *outcome.gaps]))
        at = [outcome.started - first + t for t in times]
        if start <= at[0] < end:
            prompt += outcome.prompt_tokens or 0
        scale = (outcome.completion_tokens or len(at)) / len(at)  # chunks to tokens
        completion += scale * sum(1 for t in at if start <= t < end)
    done = [o for o in batch.outcomes if o.kind == "ok"]
    return {
        "requests": len(batch.outcomes),
        "ok": len(done),
        "prompt_tokens": round(prompt),
        "completion_tokens": round(completion),
        "tok_s": (prompt + completion) / window,
    }


def table(results: dict[str, Any]) -> str:
    found = results.get("token_fairness")
    if not found:
        return ""
    if "error" in found:
        return f"e) Token fairness: {found['error']}"
    rows = []
    for policy, figures in found["policies"].items():
        for user in ("heavy", "light"):
            f = figures[user]
            ratio = figures["heavy_over_light"] if user == "heavy" else None
            rows.append([policy, user, f["ok"], f["prompt_tokens"], f["completion_tokens"],
                         f["tok_s"], ratio])  # fmt: skip
    headers = ["policy", "user", "ok", "prompt tok", "completion tok", "tok/s", "heavy/light"]
    plan = found["plan"]
    title = (
        f"e) Token fairness through the gateway ({found['slots']} slots, {found['clients']} "
        f"streams per user; tokens received in {plan['window']:g} s after {plan['warmup']:g} s)"
    )
    return title + "\n" + grid(headers, rows)


def panel(results: dict[str, Any], ax: Any) -> bool:
    found = results.get("token_fairness")
    ok = bool(found and "policies" in found)
    if not ok or ax is None:
        return ok
    assert found is not None
    policies = list(found["policies"])
    for n, user in enumerate(("heavy", "light")):
        values = [found["policies"][p][user]["tok_s"] for p in policies]
        bars = ax.bar([i + (n - 0.5) * 0.35 for i in range(len(policies))], values, 0.35,
                      label=f"{user} user")  # fmt: skip
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(policies)), [f"LLAMA_PROXY_FAIRNESS={p}" for p in policies])
    ax.set_ylabel("tokens received per second (prompt + completion)")
    ax.set_title(f"e) token fairness, both users backlogged ({found['slots']} slots)")
    ax.legend(fontsize=8)
    return True
