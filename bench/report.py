"""The printed table of a run, and its JSON file; the chart is in bench/chart.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import multiturn

Row = Sequence[object]


def table(results: dict[str, Any]) -> str:
    from bench import slots, token_fairness  # they print with this module's grid

    sections = [_header(results), _overhead(results), _model(results), _fairness(results),
                slots.table(results), token_fairness.table(results), multiturn.table(results),
                _dashboard(results), _memory(results), _integrity(results),
                _targets(results)]  # fmt: skip
    return "\n\n".join(section for section in sections if section)


def save(results: dict[str, Any], directory: Path, stem: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def grid(headers: Row, rows: Sequence[Row]) -> str:
    """A plain text table: numbers right-aligned, text left-aligned."""
    cells = [[_cell(value) for value in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _header(results: dict[str, Any]) -> str:
    meta = results["meta"]
    return (
        f"Llamaserve benchmark, {meta['mode']} run, {meta['timestamp']}\n"
        f"machine: {meta['cores']} cores ({meta['cpu_model']}), {meta['memory_gib']} GiB; "
        f"load average {meta['load_average'][0]:.2f} at start, "
        f"{meta.get('load_average_end', [0.0])[0]:.2f} at the end; commit {meta['commit']}"
        f"{' (modified tree)' if meta['tree_modified'] else ''}"
    )


def _dashboard(results: dict[str, Any]) -> str:
    found = results.get("dashboard")
    if not found:
        return ""
    rows = [[q["query"], q["median_ms"], q["max_ms"]] for q in found["queries"]]
    for name, key in (("write: with the rollup", "batch_with_rollup"),
                      ("write: without it", "batch_without_rollup")):  # fmt: skip
        rows.append([f"{name} ({found['batch_rows']} rows, COPY)", *found[key].values()])
    title = (
        f"g) Dashboard queries, ms ({found['rows']:,} rows over 7 days, {found['users']} users; "
        f"{found['rollup_rows']:,} rollup rows; median of {found['runs']} runs)"
    )
    return title + "\n" + grid(["query", "median", "max"], rows)


def _overhead(results: dict[str, Any]) -> str:
    overhead = results.get("overhead")
    if not overhead:
        return ""
    mock = overhead["mock"]
    rows = []
    for case in overhead["cases"]:
        d, g = case["direct"], case["gateway"]
        rows.append([case["name"], g["requests"], d["latency_p50_ms"], g["latency_p50_ms"],
                     case["overhead_p50_ms"], d["latency_p99_ms"], g["latency_p99_ms"],
                     case["overhead_p99_ms"], d["requests_per_s"], g["requests_per_s"],
                     case["ttft_overhead_p50_ms"]])  # fmt: skip
    headers = ["case", "n", "direct p50", "gw p50", "+p50", "direct p99", "gw p99", "+p99",
               "direct rps", "gw rps", "+ttft p50"]  # fmt: skip
    metered = "; the user metered: token quota and rate, never reached"
    title = (
        f"a) Gateway overhead, ms (mock engine: {mock['delay_ms']:g} ms delay; streams "
        f"{mock['chunks']} chunks {mock['chunk_ms']:g} ms apart"
        f"{metered if overhead.get('metered') else ''})"
    )
    note = _machine_note(overhead.get("machine"), "the machine")
    return title + "\n" + grid(headers, rows) + note + "\n\n" + _cpu(overhead["cases"])


def _machine_note(machine: dict[str, float] | None, label: str) -> str:
    """How busy the machine was while a scenario ran: the figures' noise."""
    if not machine:
        return ""
    return (
        f"\n{label}, {machine['seconds']:.0f} s: {machine['cores_busy']:.2f} cores "
        f"busy on average, {machine['cores_busy_elsewhere']:.2f} of them other programs'"
    )


def _cpu(cases: list[dict[str, Any]]) -> str:
    names = ["gateway", "postgres", "mock engine", "load generator"]
    rows = []
    for case in cases:
        for path in ("direct", "gateway"):
            used = case[path].get("cpu_ms_per_request") or {}
            values = [used.get(name) for name in names]
            rows.append([case["name"], path, *values, sum(v or 0 for v in values)])
    title = "CPU ms per request, by process (the machine has 2 cores)"
    return title + "\n" + grid(["case", "path", *names, "all"], rows)


def _model(results: dict[str, Any]) -> str:
    engines = [e for e in results.get("engines", []) if "levels" in e or "error" in e]
    if not engines:
        return ""
    rows: list[Row] = []
    for engine in engines:
        name = engine["engine"] + (f" np={engine['parallel']}" if engine.get("parallel") else "")
        if "error" in engine:
            rows.append([name, "-", "error", engine["error"][:60]])
            continue
        for level in engine.get("levels", []):
            for path in ("direct", "gateway"):
                s = level[path]
                ok = f"{s['ok']}/{s['requests']}"
                rows.append([name, level["concurrency"], path, s["total_tok_s"],
                             s["stream_tok_s_p50"], s["ttft_p50_ms"], s["ttft_p99_ms"],
                             s["itl_p50_ms"], s["itl_p99_ms"], ok])  # fmt: skip
    headers = ["engine", "c", "path", "total tok/s", "stream tok/s", "ttft p50", "ttft p99",
               "itl p50", "itl p99", "ok"]  # fmt: skip
    notes = "".join(_machine_note(engine.get("machine"), engine["engine"]) for engine in engines)
    return "b) The model (max_tokens 128, temperature 0; ms)\n" + grid(headers, rows) + notes


def _fairness(results: dict[str, Any]) -> str:
    fairness = results.get("fairness")
    if not fairness:
        return ""
    if "error" in fairness:
        return f"c) Fairness: {fairness['error']}"
    rows = [
        [user, f["requests"], f["queue_p50_ms"], f["queue_max_ms"], f["ttft_p50_ms"],
         f["ttft_max_ms"]]
        for user in ("heavy", "light")
        if (f := fairness[user])
    ]  # fmt: skip
    headers = ["user", "n", "queue p50", "queue max", "ttft p50", "ttft max"]
    plan = fairness["plan"]
    title = (
        f"c) Fairness through the gateway ({fairness['engine']}; heavy user "
        f"{plan['heavy_streams']} streams at once, light user one at a time; ms)"
    )
    return title + "\n" + grid(headers, rows)


def _memory(results: dict[str, Any]) -> str:
    scenarios = []
    if results.get("overhead", {}).get("memory"):
        scenarios.append(("a) overhead", results["overhead"]["memory"]))
    scenarios += [(f"b) {e['engine']}", e["memory"]) for e in results.get("engines", [])
                  if e.get("memory")]  # fmt: skip
    rows = [[scenario, name, m["start_mib"], m["end_mib"], m["end_mib"] - m["start_mib"],
             m["peak_mib"]]
            for scenario, processes in scenarios for name, m in processes.items()]  # fmt: skip
    if not rows:
        return ""
    title = "Memory, MiB resident, at the scenario's start (before its first request) and end"
    return title + "\n" + grid(["scenario", "process", "start", "end", "growth", "peak"], rows)


def _integrity(results: dict[str, Any]) -> str:
    integrity = results.get("integrity")
    if not integrity:
        return ""
    rows = [[run["label"], run["requests"], run["ok"], run["error"], run["cut"], run["lost"],
             run["rows"], run["missing_rows"], run["usage_mismatch"]]
            for run in integrity["runs"]]  # fmt: skip
    headers = ["run", "n", "ok", "error", "cut", "lost", "rows", "missing", "tokens differ"]
    text = "h) Integrity (rows: llama_requests rows found by request id)\n" + grid(headers, rows)
    if integrity["problems"]:
        text += "\nproblems:\n" + "\n".join(f"  {p}" for p in integrity["problems"])
    return text


def _targets(results: dict[str, Any]) -> str:
    rows = [[v["result"], v["target"], v["figure"]] for v in results.get("targets", [])]
    return "Targets (issue 4)\n" + grid(["result", "target", "figure"], rows)
