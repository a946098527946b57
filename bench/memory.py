"""Memory of the processes under test, from /proc: resident set at a scenario's start and
end, and the peak, of each process tree (the gateway's supervisor and worker; an
engine's front and its llama-server). Growth over tens of thousands of requests is
what a leak would show."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bench import cpu


def _kib(pid: int, field: str) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def resident_mib(root: int) -> float:
    """Resident memory of a process and its descendants (VmRSS), in MiB."""
    return sum(_kib(pid, "VmRSS") for pid in cpu.tree(root)) / 1024


def peak_mib(root: int) -> float:
    """The sum of each process's own peak (VmHWM): at most the tree's peak, in MiB."""
    return sum(_kib(pid, "VmHWM") for pid in cpu.tree(root)) / 1024


class Watch:
    """Resident memory of named process trees at `start` and at `result`."""

    def __init__(self, trees: Mapping[str, int]) -> None:
        self.trees = dict(trees)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: resident_mib(pid) for name, pid in self.trees.items()}

    def result(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "start_mib": round(self._start.get(name, 0.0), 1),
                "end_mib": round(resident_mib(pid), 1),
                "peak_mib": round(peak_mib(pid), 1),
            }
            for name, pid in self.trees.items()
        }
