"""Scenario d: every request of every run ends with a finish_reason or a clear error, and
every request through the gateway has its row in `llama_requests`.

Each run's batch goes into the Ledger as it is measured; `verify` looks its gateway
requests up in the database (by the `x-request-id` the gateway answered with) while
the stack's database is still running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.load import Batch
from bench.stack import Stack
from bench.stats import kinds


@dataclass
class Entry:
    label: str
    gateway: bool
    batch: Batch
    rows: dict[str, dict[str, Any]] | None = None  # request id -> its row, once verified


@dataclass
class Ledger:
    entries: list[Entry] = field(default_factory=list)

    def add(self, label: str, batch: Batch, *, gateway: bool) -> None:
        self.entries.append(Entry(label, gateway, batch))

    def verify(self, stack: Stack) -> None:
        """Fetch the rows of every gateway run not yet verified."""
        for entry in self.entries:
            if entry.gateway and entry.rows is None:
                ids = [o.request_id for o in entry.batch.outcomes if o.request_id]
                entry.rows = stack.log_rows(ids) if ids else {}

    def summary(self) -> dict[str, Any]:
        runs = [_check(entry) for entry in self.entries]
        problems = [p for run in runs for p in run["problems"]]
        return {
            "runs": runs,
            "requests": sum(run["requests"] for run in runs),
            "cut": sum(run["cut"] for run in runs),
            "lost": sum(run["lost"] for run in runs),
            "errors": sum(run["error"] for run in runs),
            "missing_rows": sum(run["missing_rows"] or 0 for run in runs),
            "problems": problems[:50],
        }


def _check(entry: Entry) -> dict[str, Any]:
    outcomes = entry.batch.outcomes
    problems = [
        f"{entry.label}: {o.kind}: {o.cut or o.error} (request id {o.request_id})"
        for o in outcomes
        if o.kind != "ok"
    ]
    run: dict[str, Any] = {"label": entry.label, "gateway": entry.gateway,
                           "requests": len(outcomes), **kinds(entry.batch)}  # fmt: skip
    run.update(rows=None, missing_rows=None, usage_mismatch=None)
    if entry.gateway and entry.rows is not None:
        missing = [o for o in outcomes if not o.request_id or o.request_id not in entry.rows]
        mismatched = [o for o in outcomes if _usage_differs(o, entry.rows)]
        problems += [f"{entry.label}: no llama_requests row for {o.request_id}" for o in missing]
        problems += [f"{entry.label}: tokens differ from the row of {o.request_id}"
                     for o in mismatched]  # fmt: skip
        run.update(rows=len(entry.rows), missing_rows=len(missing),
                   usage_mismatch=len(mismatched))  # fmt: skip
    run["problems"] = problems
    return run


def _usage_differs(outcome: Any, rows: dict[str, dict[str, Any]]) -> bool:
    """A finished request whose logged completion tokens are not what the client got."""
    row = rows.get(outcome.request_id or "")
    if row is None or outcome.kind != "ok" or outcome.completion_tokens is None:
        return False
    return bool(row["completion_tokens"] != outcome.completion_tokens)
