"""CPU time of the processes under test, from /proc: what each one costs per request.

On a shared two-core machine latency depends on everyone's load; CPU seconds per
request are steadier, and say where the gateway's overhead goes (the gateway itself,
PostgreSQL, the mock engine, the load generator).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 onwards); [] if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """A process and all its descendants."""
    parents = {pid: fields[1] for pid in pids() if (fields := stat_fields(pid))}
    found, frontier = [root], {str(root)}
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = {str(pid) for pid in children}
    return found


def seconds(root: int, descendants: bool = True) -> float:
    """User and system CPU seconds of a process (and its descendants, as far as they are
    alive)."""
    total = 0
    for pid in tree(root) if descendants else [root]:
        fields = stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


class Meter:
    """CPU seconds of named processes between two readings. A process tree counts its
    descendants (PostgreSQL's backends); a single process (the load generator, whose
    children are the processes under test) only itself."""

    def __init__(self, trees: Mapping[str, int], singles: Mapping[str, int]) -> None:
        self.roots = {name: (pid, True) for name, pid in trees.items()}
        self.roots.update({name: (pid, False) for name, pid in singles.items()})
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: seconds(*root) for name, root in self.roots.items()}

    def per_request_ms(self, requests: int) -> dict[str, float]:
        """Milliseconds of CPU per request of each process since `start`."""
        return {
            name: (seconds(*root) - self._start[name]) * 1000 / max(1, requests)
            for name, root in self.roots.items()
        }


def machine_seconds() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine since boot, all cores together."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    fields = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / TICKS, sum(fields) / TICKS


class Census:
    """How busy the machine was during a scenario, and how much of it was other programs':
    everything but the benchmark's own process trees (`roots()`, read at both ends)."""

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self._roots = roots
        self._start = (0.0, 0.0, 0.0)

    def _reading(self) -> tuple[float, float, float]:
        busy, total = machine_seconds()
        return busy, total, sum(seconds(pid) for pid in set(self._roots()))

    def start(self) -> None:
        self._start = self._reading()

    def result(self) -> dict[str, float]:
        """Cores busy on average: all programs, and all but the benchmark's."""
        end = self._reading()
        busy, total, ours = (e - b for e, b in zip(end, self._start, strict=True))
        wall = total / max(1, os.cpu_count() or 1)
        return {
            "seconds": round(wall, 1),
            "cores_busy": round(busy / wall, 2) if wall else 0.0,
            "cores_busy_elsewhere": round(max(0.0, busy - ours) / wall, 2) if wall else 0.0,
        }
