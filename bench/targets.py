"""The targets of issue 4, judged PASS or FAIL on one run's figures (n/a when the run
did not measure them). Ratios are within the run: the machine is shared and noisy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import multiturn

OVERHEAD_P50_MS = 1.0
OVERHEAD_P99_MS = 5.0
TTFT_OVERHEAD_MS = 2.0
SINGLE_STREAM_RATIO = 0.95
BATCHING_RATIO = 2.0
FAIRNESS_RATIO = 0.10
DASHBOARD_MS = 200.0  # the dashboard page's main query over 1,000,000 request-log rows
SLOTS_RATIO = 0.90  # gateway, default settings, 16 users / the best direct slot setting at 16
TOKEN_FAIRNESS_SPREAD = 0.20  # two backlogged users' tokens per second, within 20%

Verdict = dict[str, str]


def judge(results: dict[str, Any]) -> list[Verdict]:
    checks: list[Callable[[dict[str, Any]], list[Verdict]]] = [
        _overhead, _ttft, _single_stream, _batching, _fairness, _slots, _token_fairness,
        lambda r: multiturn.verdicts(r, _verdict), _integrity, _dashboard,
    ]  # fmt: skip
    return [verdict for check in checks for verdict in check(results)]


def _verdict(target: str, figure: str, ok: bool | None) -> Verdict:
    result = "n/a" if ok is None else "PASS" if ok else "FAIL"
    return {"target": target, "figure": figure, "result": result}


def _case(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    cases = (results.get("overhead") or {}).get("cases", [])
    return next((case for case in cases if case["name"] == name), None)


def _dashboard(results: dict[str, Any]) -> list[Verdict]:
    target = f"dashboard's main query with 1,000,000 rows: median <= {DASHBOARD_MS:g} ms"
    found = results.get("dashboard")
    if not found:
        return [_verdict(target, "not measured", None)]
    main = found["queries"][0]["median_ms"]
    return [_verdict(target, f"{main:.1f} ms", main <= DASHBOARD_MS)]


def _overhead(results: dict[str, Any]) -> list[Verdict]:
    target = (
        f"gateway overhead at c=32 (mock engine): p50 <= {OVERHEAD_P50_MS:g} ms, "
        f"p99 <= {OVERHEAD_P99_MS:g} ms"
    )
    case = _case(results, "chat c=32")
    if case is None or case["overhead_p50_ms"] is None:
        return [_verdict(target, "not measured", None)]
    p50, p99 = case["overhead_p50_ms"], case["overhead_p99_ms"]
    figure = f"p50 {p50:+.2f} ms, p99 {p99:+.2f} ms"
    return [_verdict(target, figure, p50 <= OVERHEAD_P50_MS and p99 <= OVERHEAD_P99_MS)]


def _ttft(results: dict[str, Any]) -> list[Verdict]:
    target = f"time to first token through the gateway within {TTFT_OVERHEAD_MS:g} ms of direct"
    case = _case(results, "stream c=1")
    if case is None or case["ttft_overhead_p50_ms"] is None:
        return [_verdict(target, "not measured", None)]
    extra = case["ttft_overhead_p50_ms"]
    figure = (
        f"stream c=1, p50: {case['direct']['ttft_p50_ms']:.2f} ms direct, "
        f"{case['gateway']['ttft_p50_ms']:.2f} ms gateway ({extra:+.2f} ms)"
    )
    return [_verdict(target, figure, extra <= TTFT_OVERHEAD_MS)]


def _level(engine: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((lv for lv in engine.get("levels", []) if lv["concurrency"] == concurrency), None)


def _single_stream(results: dict[str, Any]) -> list[Verdict]:
    verdicts = []
    for engine in results.get("engines", []):
        target = f"{engine['engine']}: one stream through the gateway >= 95% of direct tok/s"
        level = _level(engine, 1)
        direct = level and level["direct"]["stream_tok_s_p50"]
        gateway = level and level["gateway"]["stream_tok_s_p50"]
        if not direct or not gateway:
            verdicts.append(_verdict(target, engine.get("error") or "not measured", None))
            continue
        ratio = gateway / direct
        figure = f"{gateway:.1f} / {direct:.1f} tok/s = {ratio:.1%}"
        verdicts.append(_verdict(target, figure, ratio >= SINGLE_STREAM_RATIO))
    return verdicts


def _batching(results: dict[str, Any]) -> list[Verdict]:
    target = "llama-server total tok/s at 8 streams >= 2x llama_cpp.server at 8 (direct)"
    engines = {e["engine"]: e for e in results.get("engines", [])}
    rates = {}
    for name in ("llama-server", "llama-cpp-python"):
        level = _level(engines.get(name, {}), 8)
        rates[name] = level["direct"]["total_tok_s"] if level else None
    server, python = rates["llama-server"], rates["llama-cpp-python"]
    if not server or not python:
        return [_verdict(target, "needs both engines at 8 streams", None)]
    figure = f"{server:.1f} / {python:.1f} tok/s = {server / python:.2f}x"
    return [_verdict(target, figure, server >= BATCHING_RATIO * python)]


def _fairness(results: dict[str, Any]) -> list[Verdict]:
    target = "light user's queue wait p50 <= 10% of the heavy user's"
    fairness = results.get("fairness")
    if not fairness or fairness.get("light_over_heavy_queue_p50") is None:
        return [_verdict(target, (fairness or {}).get("error", "not measured"), None)]
    ratio = fairness["light_over_heavy_queue_p50"]
    light, heavy = fairness["light"]["queue_p50_ms"], fairness["heavy"]["queue_p50_ms"]
    figure = f"{light:.0f} / {heavy:.0f} ms = {ratio:.1%} ({fairness['engine']})"
    return [_verdict(target, figure, ratio <= FAIRNESS_RATIO)]


def _slots(results: dict[str, Any]) -> list[Verdict]:
    target = "16 users through the gateway, default settings: >= 90% of the best direct at 16"
    sizes = (results.get("slots") or {}).get("sizes", [])
    chosen = next((s for s in sizes if s["parallel"] == 0), None)
    level = chosen and next((lv for lv in chosen["levels"] if lv["users"] == 16), None)
    direct = [lv["direct"]["total_tok_s"] or 0 for s in sizes for lv in s["levels"]
              if lv["users"] == 16]  # fmt: skip
    if not level or not level["gateway"]["total_tok_s"] or not max(direct, default=0):
        return [_verdict(target, "not measured", None)]
    gateway, best = level["gateway"]["total_tok_s"], max(direct)
    figure = f"{gateway:.1f} / {best:.1f} tok/s = {gateway / best:.1%} ({chosen['slots']} slots)"
    return [_verdict(target, figure, gateway >= SLOTS_RATIO * best)]


def _token_fairness(results: dict[str, Any]) -> list[Verdict]:
    target = "two backlogged users' tokens per second within 20% of each other (by tokens)"
    found = (results.get("token_fairness") or {}).get("policies", {})
    ratio = (found.get("tokens") or {}).get("heavy_over_light")
    if not ratio:
        return [_verdict(target, "not measured", None)]
    old = (found.get("requests") or {}).get("heavy_over_light")
    figure = f"heavy / light = {ratio:.2f}" + (f" (by requests: {old:.2f})" if old else "")
    spread = abs(1 - min(ratio, 1 / ratio))
    return [_verdict(target, figure, spread <= TOKEN_FAIRNESS_SPREAD)]


def _integrity(results: dict[str, Any]) -> list[Verdict]:
    target = "no stream cut off, no request lost, every gateway request logged"
    integrity = results.get("integrity") or {}
    if not integrity.get("requests"):
        return [_verdict(target, "not measured", None)]
    figure = (
        f"{integrity['requests']} requests: {integrity['cut']} cut off, {integrity['lost']} "
        f"lost, {integrity['errors']} errors, {integrity['missing_rows']} missing rows"
    )
    ok = not integrity["cut"] and not integrity["lost"] and not integrity["missing_rows"]
    return [_verdict(target, figure, ok)]
