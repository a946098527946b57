"""Scenario: multi-turn conversations, and whether each turn finds its history cached.

Eight conversations of eight turns each, all at once, through the gateway on
`llama-server`. Each turn resends the whole history: a system prompt of about 250 tokens,
then each earlier question (about 45 tokens) and answer (`max_tokens` 32, temperature 0),
then the new question; a conversation sends its next turn as soon as it has the answer.
Four cases, each with conversations of its own (their first words differ, so that no
case finds another's prompts cached):

- **one engine**: the stack's engine, its slots the machine's default (16 here: more than
  the conversations), through the stack's gateway;
- **one engine, 4 slots**: an engine with half as many slots as conversations, the busy
  case the targets judge, through a gateway of its own;
- **two engines, prefix** and **two engines, least-loaded**: a second engine like the
  first (as many slots), and a gateway in front of both with LLAMA_PROXY_ROUTING set so.

Per turn: time to first token (the client's), the queue wait (`llama_requests.queue_ms`),
time to first token minus queue wait (per request, then the median), and the share of
the turn's prompt tokens that came from the engine's cache (llama-server's own count,
`usage.prompt_tokens_details.cached_tokens`, summed over the conversations).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench import load
from bench.integrity import Ledger
from bench.load import Batch, Client, Outcome, Target
from bench.model import TIMEOUT
from bench.stack import Stack, free_port
from bench.stats import percentile

CACHED_SHARE = 0.80  # of prompt tokens from the cache, each turn from the second on
TTFT_GROWTH = 1.5  # turn 8's time to first token minus queue wait, over turn 2's
# The case the targets judge: more conversations than the engine's slots (the default size
# of this machine, 16, holds the eight at once).
BUSY_SLOTS = 4
BUSY = f"one engine, {BUSY_SLOTS} slots"
TOPICS = ("tides", "volcanoes", "bread", "bicycles", "bees", "glaciers", "violins", "comets")
SYSTEM = (
    "You are Ada, the assistant of a public library's science desk. Visitors of every age "
    "ask you about the natural world and about how things work. Answer in plain words, "
    "in two or three sentences, and give one concrete example a visitor could see or try "
    "at home. When a question is unclear, say what you understood and answer that. Never "
    "invent a source; when you are not sure, say so, and point to the library's shelves "
    "on the subject: the 500s for natural sciences, the 600s for technology. Keep a warm "
    "and patient tone; many visitors are children, some are experts, and you cannot tell "
    "which until they say. Do not use lists or headings, only sentences. Do not repeat "
    "the question. If a visitor asks about something dangerous, explain the danger first. "
    "If a visitor thanks you, thank them back in a few words and offer one more fact. "
    "Today's topic at the desk is {topic}, and the visitor's questions follow."
)
QUESTIONS = (
    "I am reading about {topic} for a school project. What is the one thing about {topic} "
    "that most people get wrong, and how would you explain it to my class tomorrow?",
    "Thank you. Can you tell me how people first found out about that, long ago, and what "
    "tools they used? My teacher likes stories about discoveries a lot.",
    "That is interesting. Is there an experiment about {topic} that I could do at home "
    "with things from the kitchen, safely, and what should I expect to see?",
    "What would change in our town if {topic} behaved differently, say twice as strong or "
    "twice as often? Please think about the people who live near the river.",
    "Which numbers about {topic} should I remember for my project? Only two or three, and "
    "please tell me where they come from so that I can check them in a book.",
    "My little brother asked me why {topic} matters to him at all. What can I tell him, "
    "in a way a seven year old would find exciting rather than boring?",
    "Are there any open questions about {topic} that scientists still argue about today? "
    "I would like to end my presentation with a mystery for the class.",
    "Finally, which books on your shelves would you recommend to go further, one for me "
    "and one for my teacher, who already knows a lot about {topic}?",
)


@dataclass(frozen=True)
class Plan:
    conversations: int = 8
    turns: int = 8
    max_tokens: int = 32
    pause: tuple[float, float] = (0.0, 0.0)  # seconds between a turn's answer and the next


# Two engines have as many slots as the conversations: without pauses each turn finds a
# slot free only where its conversation's last turn just ended, whatever the routing.
# Reading time between turns leaves slots free on both, and the routing chooses.
READING = (0.5, 2.5)
SEED = 21


@dataclass
class Turn:
    conversation: int
    turn: int  # from 1
    outcome: Outcome


def run(stack: Stack, key: str, model_id: str, ledger: Ledger) -> dict[str, Any]:
    """The four cases; the engines and gateways started for them are stopped at the end."""
    plan = Plan()
    cases = [_case(stack, "one engine", Target(stack.gateway_url, key, model_id), plan, ledger)]
    argv = [sys.executable, "-m", "llamaserve", "serve-engine"]
    port = free_port()
    busy = f"http://127.0.0.1:{port}"
    with (
        stack.process("engine-busy", argv, busy + "/health", LLAMA_SERVER_PORT=str(port),
                      LLAMA_PARALLEL=str(BUSY_SLOTS)),
        stack.gateway_to(busy) as gateway,
    ):  # fmt: skip
        target = Target(gateway.url, key, model_id)
        cases.append(_case(stack, BUSY, target, plan, ledger))
    port = free_port()
    second = f"http://127.0.0.1:{port}"
    reading = replace(plan, pause=READING)
    with stack.process("engine-2", argv, second + "/health", LLAMA_SERVER_PORT=str(port)):
        for routing in ("prefix", "least-loaded"):
            backends = f"{stack.engine_url},{second}"
            with stack.gateway_to(backends, LLAMA_PROXY_ROUTING=routing) as gateway:
                target = Target(gateway.url, key, model_id)
                cases.append(_case(stack, f"two engines, {routing}", target, reading, ledger))
    return {"plan": asdict(plan), "cases": cases}


def _case(stack: Stack, name: str, target: Target, plan: Plan, ledger: Ledger) -> dict[str, Any]:
    turns = load.run(_converse(target, plan, marker=name))
    batch = Batch([t.outcome for t in turns], sum(t.outcome.latency for t in turns))
    ledger.add(f"multiturn {name}", batch, gateway=True)
    rows = stack.log_rows([t.outcome.request_id for t in turns if t.outcome.request_id])
    return {"name": name, "pause": plan.pause, **_summary(turns, rows, plan)}


async def _converse(target: Target, plan: Plan, marker: str) -> list[Turn]:
    turns: list[Turn] = []
    async with Client(target.url, target.key, plan.conversations, TIMEOUT) as client:
        await asyncio.gather(
            *(_conversation(client, target.model, plan, marker, n, turns)
              for n in range(plan.conversations))
        )  # fmt: skip
    return turns


async def _conversation(
    client: Client, model: str, plan: Plan, marker: str, n: int, turns: list[Turn]
) -> None:
    topic = TOPICS[n % len(TOPICS)]
    opening = f"[{marker}, visitor {n + 1}] " + SYSTEM.format(topic=topic)
    messages = [{"role": "system", "content": opening}]
    reading = random.Random(SEED + n)
    for turn in range(plan.turns):
        if turn:
            await asyncio.sleep(reading.uniform(*plan.pause))
        question = QUESTIONS[turn % len(QUESTIONS)].format(topic=topic)
        messages.append({"role": "user", "content": question})
        outcome = await client.chat(_body(model, messages, plan), stream=True, keep_text=True)
        turns.append(Turn(n, turn + 1, outcome))
        if outcome.kind != "ok":
            return  # the integrity check reports it
        messages.append({"role": "assistant", "content": outcome.text or ""})


def _body(model: str, messages: list[dict[str, str]], plan: Plan) -> bytes:
    return json.dumps({
        "model": model, "messages": messages, "max_tokens": plan.max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip


def _summary(turns: list[Turn], rows: dict[str, dict[str, Any]], plan: Plan) -> dict[str, Any]:
    per_turn = []
    for number in range(1, plan.turns + 1):
        these = [t.outcome for t in turns if t.turn == number and t.outcome.kind == "ok"]
        per_turn.append(_turn(number, these, rows))
    # Turns 2 on pooled: 8 requests per turn make a noisy median on a shared machine.
    later = [t.outcome for t in turns if t.turn >= 2 and t.outcome.kind == "ok"]
    engines: dict[int, set[str]] = {}
    for t in turns:
        row = rows.get(t.outcome.request_id or "") or {}
        if row.get("engine"):
            engines.setdefault(t.conversation, set()).add(row["engine"])
    return {
        "turns": per_turn,
        "later_turns": {**_turn(0, later, rows), "turn": f"2-{plan.turns}"},
        # How many engines each conversation's turns went to (1: it stayed on one).
        "engines_per_conversation": [len(engines.get(n, ())) for n in range(plan.conversations)],
    }


def _turn(number: int, done: list[Outcome], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    waits = [(rows.get(o.request_id or "") or {}).get("queue_ms") for o in done]
    ttfts = [o.ttft * 1000 for o in done if o.ttft is not None]
    served = [
        o.ttft * 1000 - wait for o, wait in zip(done, waits, strict=True)
        if o.ttft is not None and wait is not None
    ]  # fmt: skip
    prompt = sum(o.prompt_tokens or 0 for o in done)
    counted = [o.cached_tokens for o in done if o.cached_tokens is not None]
    cached = sum(counted) if counted else None  # None: the engine does not say
    return {
        "turn": number,
        "requests": len(done),
        "ttft_p50_ms": percentile(ttfts, 50),
        "queue_p50_ms": percentile([w for w in waits if w is not None], 50),
        "ttft_minus_queue_p50_ms": percentile(served, 50),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": cached / prompt if prompt and cached is not None else None,
    }


def _turns(results: dict[str, Any], case: str) -> dict[int, dict[str, Any]]:
    found = [c for c in (results.get("multiturn") or {}).get("cases", []) if c["name"] == case]
    return {t["turn"]: t for t in found[0]["turns"]} if found else {}


def _later(results: dict[str, Any], case: str) -> str:
    found = [c for c in (results.get("multiturn") or {}).get("cases", []) if c["name"] == case]
    value = found[0]["later_turns"]["ttft_p50_ms"] if found else None
    return "-" if value is None else f"{value:.0f}"


def verdicts(results: dict[str, Any], verdict: Callable[[str, str, bool | None], Any]) -> list[Any]:
    """The issue's three targets, judged on one run."""
    one = _turns(results, BUSY)
    target = f"multi-turn, {BUSY}: from turn 2 on, >= {CACHED_SHARE:.0%} of prompts cached"
    shares = [t["cached_share"] for n, t in one.items() if n >= 2]
    if not shares or None in shares:
        found = [verdict(target, "not measured", None)]
    else:
        low = min(shares)
        figure = f"lowest {low:.1%} (turns 2-{max(one)}: " + ", ".join(f"{s:.0%}" for s in shares)
        found = [verdict(target, figure + ")", low >= CACHED_SHARE)]
    target = f"multi-turn, {BUSY}: turn 8 ttft - queue wait <= {TTFT_GROWTH:g}x turn 2's"
    last, second = (one.get(n, {}).get("ttft_minus_queue_p50_ms") for n in (8, 2))
    if last is None or not second:
        found.append(verdict(target, "not measured", None))
    else:
        figure = f"{last:.0f} / {second:.0f} ms = {last / second:.2f}x (p50)"
        found.append(verdict(target, figure, last <= TTFT_GROWTH * second))
    target = "multi-turn, two engines: prefix routing beats least-loaded on turn 8 ttft p50"
    prefix, least = (_turns(results, f"two engines, {r}").get(8, {}).get("ttft_p50_ms")
                     for r in ("prefix", "least-loaded"))  # fmt: skip
    if prefix is None or least is None:
        found.append(verdict(target, "not measured", None))
    else:
        pooled = [_later(results, f"two engines, {r}") for r in ("prefix", "least-loaded")]
        figure = f"{prefix:.0f} vs {least:.0f} ms (turns 2 on, pooled: {pooled[0]} vs {pooled[1]})"
        found.append(verdict(target, figure, prefix < least))
    return found


def table(results: dict[str, Any]) -> str:
    from bench.report import grid  # report prints this table: imported late, no cycle

    multiturn = results.get("multiturn")
    if not multiturn:
        return ""
    if "error" in multiturn:
        return f"f) Multi-turn: {multiturn['error']}"
    rows = [
        [case["name"], t["turn"], t["requests"], t["ttft_p50_ms"], t["queue_p50_ms"],
         t["ttft_minus_queue_p50_ms"], t["prompt_tokens"], t["cached_tokens"],
         None if t["cached_share"] is None else round(100 * t["cached_share"], 1)]
        for case in multiturn["cases"] for t in [*case["turns"], case["later_turns"]]
    ]  # fmt: skip
    headers = ["case", "turn", "n", "ttft p50", "queue p50", "ttft-queue p50", "prompt tok",
               "cached tok", "cached %"]  # fmt: skip
    plan = multiturn["plan"]
    title = (
        f"f) Multi-turn ({plan['conversations']} conversations x {plan['turns']} turns at once, "
        f"max_tokens {plan['max_tokens']}; ms)"
    )
    spread = "\n".join(
        f"{case['name']}: pauses {case['pause'][0]:g}-{case['pause'][1]:g} s between turns; "
        f"engines per conversation {case['engines_per_conversation']}"
        for case in multiturn["cases"]
    )
    return title + "\n" + grid(headers, rows) + "\n" + spread


def panel(results: dict[str, Any], ax: Any) -> bool:
    """Time to first token p50 by turn, per case, with and without the queue wait."""
    cases = (results.get("multiturn") or {}).get("cases")
    if not cases or ax is None:
        return bool(cases)
    for case in cases:
        turns = [t["turn"] for t in case["turns"]]
        line = ax.plot(turns, [(t["ttft_p50_ms"] or 0) / 1000 for t in case["turns"]], "-o",
                       label=f"{case['name']}: ttft")[0]  # fmt: skip
        served = [(t["ttft_minus_queue_p50_ms"] or 0) / 1000 for t in case["turns"]]
        ax.plot(turns, served, ":", color=line.get_color(), label=f"{case['name']}: - queue")
    ax.set_xlabel("turn")
    ax.set_ylabel("seconds (p50)")
    ax.set_ylim(bottom=0)
    ax.set_title("multi-turn: time to first token by turn")
    ax.legend(fontsize=7)
    return True
