"""Scenario d: llama-server's slots, at the size chosen for the machine (LLAMA_PARALLEL=0,
the default) and at 4 (the old default), each started with `console.sh start`.

At each size, streams of the model scenario's prompts (`max_tokens` 128, temperature 0)
at 1, 4, 8 and 16 users at once, each user sending `rounds` requests one after the
other: directly to the engine, then through the gateway with its default settings.
Total tok/s is all completion tokens over the wall time; latency is each request's to
its last token, the mean over the level. Scenario e (token fairness, its own module)
runs on the engine at the chosen size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench import load, token_fairness
from bench.integrity import Ledger
from bench.load import Batch, Client, Target
from bench.model import TIMEOUT, body
from bench.progress import say
from bench.report import grid
from bench.stack import Stack

SIZES = (0, 4)  # LLAMA_PARALLEL: chosen for the machine, then the old default


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...] = (1, 4, 8, 16)
    rounds: int = 2  # requests per user at each level

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        return cls(rounds=1) if quick else cls()


def run(stack: Stack, keys: dict[str, str], scenarios: list[str], quick: bool,
        ledger: Ledger, results: dict[str, Any]) -> None:  # fmt: skip
    """Both sizes for `slots`, the chosen one only for `token-fairness`; results under
    "slots" and "token_fairness"."""
    sizes = []
    for parallel in SIZES if "slots" in scenarios else SIZES[:1]:
        say(f"d) llama-server with LLAMA_PARALLEL={parallel} (console.sh start)")
        stack.start("llama-server", parallel)
        try:
            model_id = stack.model_id()
            slots = stack.engine_slots()
            if "slots" in scenarios:
                direct = Target(stack.engine_url, stack.engine_key, model_id)
                gateway = Target(stack.gateway_url, keys["slots"], model_id)
                levels = load.run(_measure(direct, gateway, Plan.for_run(quick), slots, ledger))
                sizes.append({"parallel": parallel, "slots": slots, "levels": levels})
            if parallel == 0 and "token-fairness" in scenarios:
                say(f"e) token fairness through the gateway ({slots} slots)")
                heavy = Target(stack.gateway_url, keys["tf-heavy"], model_id)
                light = Target(stack.gateway_url, keys["tf-light"], model_id)
                plan = token_fairness.Plan.for_run(quick)
                results["token_fairness"] = token_fairness.run(
                    stack, heavy, light, slots, plan, ledger
                )
        finally:
            stack.stop()
    if sizes:
        results["slots"] = {"sizes": sizes}


async def _measure(
    direct: Target, gateway: Target, plan: Plan, slots: int, ledger: Ledger
) -> list[dict[str, Any]]:
    top = max(plan.levels)
    levels = []
    async with (
        Client(direct.url, direct.key, connections=top, timeout=TIMEOUT) as d,
        Client(gateway.url, gateway.key, connections=top, timeout=TIMEOUT) as g,
    ):
        await d.chat(body(direct.model, 7), stream=True)  # first-request costs
        for users in plan.levels:
            level: dict[str, Any] = {"users": users}
            for path, client, target in (("direct", d, direct), ("gateway", g, gateway)):
                batch = await _loop(client, target.model, users, users * plan.rounds)
                ledger.add(f"slots np={slots} u={users} {path}", batch, gateway=path == "gateway")
                level[path] = _summary(batch)
            levels.append(level)
    return levels


async def _loop(client: Client, model: str, users: int, total: int) -> Batch:
    async def send(i: int) -> load.Outcome:
        return await client.chat(body(model, i), stream=True)

    return await load.closed_loop(send, users, total, limit=TIMEOUT)


def _summary(batch: Batch) -> dict[str, Any]:
    done = [o for o in batch.outcomes if o.kind == "ok"]
    tokens = sum(o.completion_tokens or 0 for o in done)
    return {
        "requests": len(batch.outcomes),
        "ok": len(done),
        "total_tok_s": tokens / batch.wall if batch.wall > 0 else None,
        "latency_mean_ms": 1000 * sum(o.latency for o in done) / len(done) if done else None,
    }


def at(results: dict[str, Any], users: int, path: str) -> dict[int, float]:
    """Total tok/s at `users` on `path`, by the engine's slots."""
    found: dict[int, float] = {}
    for size in (results.get("slots") or {}).get("sizes", []):
        for level in size["levels"]:
            rate = level[path]["total_tok_s"]
            if level["users"] == users and rate:
                found[size["slots"]] = rate
    return found


def table(results: dict[str, Any]) -> str:
    sizes = (results.get("slots") or {}).get("sizes")
    if not sizes:
        return ""
    rows = []
    for size in sizes:
        name = f"{size['slots']}" + (" (chosen)" if size["parallel"] == 0 else "")
        for level in size["levels"]:
            for path in ("direct", "gateway"):
                s = level[path]
                rows.append([name, level["users"], path, s["total_tok_s"], s["latency_mean_ms"],
                             f"{s['ok']}/{s['requests']}"])  # fmt: skip
    headers = ["slots", "users", "path", "total tok/s", "mean latency ms", "ok"]
    return "d) llama-server's slots (max_tokens 128)\n" + grid(headers, rows)


def panel(results: dict[str, Any], ax: Any) -> bool:
    sizes = (results.get("slots") or {}).get("sizes")
    if not sizes or ax is None:
        return bool(sizes)
    for size in sizes:
        users = [lv["users"] for lv in size["levels"]]
        for path, style in (("direct", "-o"), ("gateway", "--s")):
            rates = [lv[path]["total_tok_s"] or 0 for lv in size["levels"]]
            chosen = " (chosen)" if size["parallel"] == 0 else ""
            ax.plot(users, rates, style, label=f"{size['slots']} slots{chosen} {path}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 8, 16], ["1", "4", "8", "16"])
    ax.set_xlabel("users at once")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("total completion tok/s")
    ax.set_title("d) llama-server's slots")
    ax.legend(fontsize=8)
    return True
