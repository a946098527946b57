"""`python -m bench`: run the benchmark, print its table, write JSON and a PNG chart.

Everything runs in a temporary runtime directory (its own config.env, private
PostgreSQL, users and ports on 127.0.0.1) and is stopped at the end; the checkout's
own runtime/ is not touched. The user's LLAMA_MODEL, LLAMA_N_THREADS and the other
names in `stack.PASSTHROUGH` carry over from the environment. `--metered` gives the
overhead scenario's user a token quota and a token rate limit (never reached): what
metering costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import (
    chart,
    cpu,
    dashboard,
    fairness,
    machine,
    memory,
    model,
    multiturn,
    overhead,
    report,
    slots,
    targets,
)
from bench.integrity import Ledger
from bench.load import Target
from bench.progress import say
from bench.stack import ROOT, BenchError, Stack, guarded, take_environment

SCENARIOS = ("overhead", "model", "fairness", "slots", "token-fairness", "multiturn", "dashboard")
# Tried in this order; fairness runs on the first that starts.
ENGINE_PREFERENCE = ("llama-server", "llama-cpp-python")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (about 10 minutes)")
    parser.add_argument(
        "--only",
        type=_names(SCENARIOS),
        default=list(SCENARIOS),
        help="comma-separated scenarios: overhead,model,fairness,slots,token-fairness,"
        "multiturn,dashboard (default all)",
    )
    parser.add_argument(
        "--engines",
        type=_names(ENGINE_PREFERENCE),
        default=list(ENGINE_PREFERENCE),
        help="comma-separated engines (default llama-cpp-python,llama-server)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="LLAMA_PARALLEL of the model and fairness scenarios: llama-server's slots "
        "(default 0: chosen for the machine)",
    )
    parser.add_argument(
        "--mock-delay-ms",
        type=float,
        default=50.0,
        help="the mock engine's answer delay (default 50)",
    )
    parser.add_argument(
        "--metered",
        action="store_true",
        help="the overhead scenario's user has a token quota and a token rate limit "
        "(never reached)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="directory of the JSON and PNG (default bench/results)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary runtime directory (logs) for a post-mortem",
    )
    return parser.parse_args(argv)


def _names(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return names

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded("bench", lambda: _bench(args))


def _bench(args: argparse.Namespace) -> int:
    passthrough = take_environment()
    mode = "quick" if args.quick else "full"
    stem = "bench-" + time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    stem += "-metered" if args.metered else ""
    results: dict[str, Any] = {"meta": {**machine.machine(), "mode": mode, "argv": sys.argv}}
    ledger = Ledger()
    say(f"setting up a private stack ({mode} run)")
    stack = Stack.create(passthrough)
    results["meta"]["config"] = stack.public_config()
    try:
        _run(args, stack, ledger, results)
    finally:
        say(f"stopping the stack; its logs go to {args.out / (stem + '-logs')}")
        stack.destroy(keep=args.keep, logs_to=args.out / f"{stem}-logs")
        if args.keep:
            say(f"kept {stack.base}")
    results["meta"]["load_average_end"] = list(os.getloadavg())
    _finish(args, results, ledger, stem)
    return 0


@dataclass
class Run:
    """One run's options, stack, ledger, results so far, and the users' keys."""

    args: argparse.Namespace
    stack: Stack
    ledger: Ledger
    results: dict[str, Any]
    keys: dict[str, str] = field(default_factory=dict)


def _run(args: argparse.Namespace, stack: Stack, ledger: Ledger, results: dict[str, Any]) -> None:
    if "dashboard" in args.only:
        say("g) the dashboard's queries over 1,000,000 request-log rows")
        results["dashboard"] = dashboard.run(stack, args.quick)
    if "overhead" in args.only:
        say("a) gateway overhead against the mock engine")
        mock = overhead.MockSettings(delay_ms=args.mock_delay_ms)
        results["overhead"] = overhead.run(stack, mock, args.quick, ledger, metered=args.metered)
    if "slots" in args.only or "token-fairness" in args.only:
        names = ("slots", "tf-heavy", "tf-light")
        keys = {name: stack.create_user(f"bench-{name}") for name in names}
        slots.run(stack, keys, args.only, args.quick, ledger, results)
    if not {"model", "fairness", "multiturn"} & set(args.only):
        return
    names = ("model", "heavy", "light", "multiturn")
    keys = {name: stack.create_user(f"bench-{name}") for name in names}
    run = Run(args, stack, ledger, results, keys)
    results["engines"] = []
    for engine in [e for e in ENGINE_PREFERENCE if e in args.engines]:
        if _has_work(args, results, engine):
            results["engines"].append(_engine(run, engine))
    if "fairness" in args.only and "fairness" not in results:
        results["fairness"] = {"error": "no engine started"}


def _has_work(args: argparse.Namespace, results: dict[str, Any], engine: str) -> bool:
    """Whether a scenario asked for still needs this engine (fairness runs on the first
    that starts; multi-turn on llama-server, whose cached tokens it counts)."""
    if "model" in args.only or ("fairness" in args.only and "fairness" not in results):
        return True
    return "multiturn" in args.only and engine == "llama-server"


def _engine(run: Run, engine: str) -> dict[str, Any]:
    """Start one engine with `console.sh start`, measure it, stop it."""
    stack = run.stack
    entry: dict[str, Any] = {"engine": engine}
    if engine == "llama-server":
        entry["parallel"] = run.args.parallel
    say(f"b) starting {engine} (console.sh start)")
    try:
        stack.start(engine, run.args.parallel)
    except BenchError as exc:
        entry["error"] = f"did not start: {str(exc).splitlines()[-1][:300]}"
        say(f"   {engine} {entry['error']}")
        return entry
    try:
        entry.update(threads=machine.threads(stack.settings()), build=machine.engine_build(stack))
        census = cpu.Census(stack.pids)
        census.start()
        held = memory.Watch(stack.service_pids())  # the model loaded, before any request
        held.start()
        _measure_engine(run, engine, entry)
        entry["machine"] = census.result()
        entry["memory"] = held.result()
        say(f"d) {engine}: looking up the request log")
        run.ledger.verify(stack)
    finally:
        stack.stop()
    return entry


def _measure_engine(run: Run, engine: str, entry: dict[str, Any]) -> None:
    args, stack, keys = run.args, run.stack, run.keys
    model_id = stack.model_id()
    if "model" in args.only:
        say(f"b) {engine}: streams at 1, 4, 8, 16 at once, direct and through the gateway")
        direct = Target(stack.engine_url, stack.engine_key, model_id)
        gateway = Target(stack.gateway_url, keys["model"], model_id)
        plan = model.Plan.for_run(args.quick)
        entry["levels"] = model.run(direct, gateway, plan, engine, run.ledger)
    if "fairness" in args.only and "fairness" not in run.results:
        say(f"c) fairness through the gateway on {engine}")
        heavy = Target(stack.gateway_url, keys["heavy"], model_id)
        light = Target(stack.gateway_url, keys["light"], model_id)
        plan_f = fairness.Plan.for_run(args.quick, stack.engine_slots())
        run.results["fairness"] = fairness.run(stack, heavy, light, plan_f, engine, run.ledger)
    if "multiturn" in args.only and engine == "llama-server":
        say(f"e) multi-turn conversations through the gateway on {engine}, one and two engines")
        run.results["multiturn"] = multiturn.run(stack, keys["multiturn"], model_id, run.ledger)


def _finish(args: argparse.Namespace, results: dict[str, Any], ledger: Ledger, stem: str) -> None:
    results["integrity"] = ledger.summary()
    results["targets"] = targets.judge(results)
    # Saved first: the figures outlive any mistake in presenting them.
    written = [report.save(results, args.out, stem), args.out / f"{stem}-logs"]
    print(report.table(results))
    if chart.available():
        written.append(chart.draw(results, args.out / f"{stem}.png"))
    else:
        print(chart.INSTALL_HINT)
    print("\nwritten: " + ", ".join(os.path.relpath(path) for path in written))


if __name__ == "__main__":
    sys.exit(main())
