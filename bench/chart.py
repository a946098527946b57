"""The PNG chart of a run: gateway overhead, throughput by concurrency, and fairness.

Needs matplotlib (`pip install -e '.[bench]'`); without it the run still prints its
table and writes its JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import multiturn, slots, token_fairness

INSTALL_HINT = "no chart: matplotlib is missing (.venv/bin/pip install -e '.[bench]')"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = (_overhead, _throughput, _fairness, slots.panel, token_fairness.panel, multiturn.panel)
    panels = [p for p in every if p(results, None)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.8))
    for panel, ax in zip(panels, [axes] if len(panels) == 1 else axes, strict=True):
        panel(results, ax)
    meta = results["meta"]
    fig.suptitle(
        f"Llamaserve benchmark ({meta['mode']}), {meta['timestamp']}: {meta['cores']} cores "
        f"{meta['cpu_model']}, commit {meta['commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _overhead(results: dict[str, Any], ax: Any) -> bool:
    cases = (results.get("overhead") or {}).get("cases")
    if not cases or ax is None:
        return bool(cases)
    width = 0.35
    for n, (key, label) in enumerate((("overhead_p50_ms", "p50"), ("overhead_p99_ms", "p99"))):
        values = [case[key] or 0 for case in cases]
        where = [i + (n - 0.5) * width for i in range(len(cases))]
        bars = ax.bar(where, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(1, color="tab:blue", linestyle=":", linewidth=1, label="target p50 (c=32)")
    ax.axhline(5, color="tab:orange", linestyle=":", linewidth=1, label="target p99 (c=32)")
    ax.set_xticks(range(len(cases)), [case["name"] for case in cases])
    ax.set_ylabel("gateway minus direct, ms")
    delay = results["overhead"]["mock"]["delay_ms"]
    ax.set_title(f"a) gateway overhead, mock engine ({delay:g} ms)")
    ax.legend(fontsize=8)
    return True


def _throughput(results: dict[str, Any], ax: Any) -> bool:
    engines = [e for e in results.get("engines", []) if e.get("levels")]
    if not engines or ax is None:
        return bool(engines)
    for engine in engines:
        levels = [lv["concurrency"] for lv in engine["levels"]]
        for path, style in (("direct", "-o"), ("gateway", "--s")):
            rates = [lv[path]["total_tok_s"] or 0 for lv in engine["levels"]]
            ax.plot(levels, rates, style, label=f"{_name(engine)} {path}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 8, 16], ["1", "4", "8", "16"])
    ax.set_xlabel("concurrent streams")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("total completion tok/s")
    ax.set_title("b) the model: total throughput")
    ax.legend(fontsize=8)
    return True


def _fairness(results: dict[str, Any], ax: Any) -> bool:
    fairness = results.get("fairness")
    ok = bool(fairness and "heavy" in fairness)
    if not ok or ax is None:
        return ok
    assert fairness is not None
    users = ("heavy", "light")
    for n, (key, label) in enumerate((("queue_p50_ms", "queue wait p50"),
                                      ("ttft_p50_ms", "time to first token p50"))):  # fmt: skip
        values = [(fairness[user][key] or 0) / 1000 for user in users]
        bars = ax.bar([i + (n - 0.5) * 0.35 for i in range(2)], values, 0.35, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    streams = fairness["plan"]["heavy_streams"]
    ax.set_xticks(range(2), [f"heavy user ({streams} streams)", "light user (1)"])
    ax.set_ylabel("seconds")
    ax.set_title(f"c) fairness through the gateway ({fairness['engine']})")
    ax.legend(fontsize=8)
    return True


def _name(engine: dict[str, Any]) -> str:
    parallel = engine.get("parallel")
    return str(engine["engine"]) + (f" np={parallel}" if parallel else "")
