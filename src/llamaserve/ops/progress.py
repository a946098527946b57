"""One progress line for a long step of the install: rewritten in place on a terminal,
a plain line every tenth otherwise (a log file or CI keeps a readable record)."""

from __future__ import annotations

import re
from typing import TextIO

# `[ 45%] Building CXX object ...` (make, and CMake's own messages) and
# `[12/230] Building CXX object ...` (ninja), at the start of a line.
MAKE_PROGRESS = re.compile(r"^\[\s*(\d{1,3})%\]")
NINJA_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")


def percent_of(line: str) -> int | None:
    """The percentage a build tool's output line reports, or None for any other line."""
    if made := MAKE_PROGRESS.match(line):
        return min(int(made[1]), 100)
    if ninja := NINJA_PROGRESS.match(line):
        done, total = int(ninja[1]), int(ninja[2])
        return min(done * 100 // total, 100) if total else None
    return None


class ProgressLine:
    """`label  NN%`, shown only when it changes (on a terminal) or passes a tenth."""

    def __init__(self, out: TextIO, label: str) -> None:
        self.out = out
        self.label = label
        self.in_place = out.isatty()
        self.shown: int | None = None

    def update(self, percent: int) -> None:
        step = percent if self.in_place else percent // 10 * 10
        if self.shown is not None and step <= self.shown:
            return  # make's parallel jobs report out of order; never go backwards
        self.shown = step
        if self.in_place:
            print(f"\r{self.label} {percent:3d}%", end="", file=self.out, flush=True)
        else:
            print(f"{self.label} {percent:3d}%", file=self.out, flush=True)

    def end(self) -> None:
        """Leave the line as it stands and go to the next one."""
        if self.in_place and self.shown is not None:
            print(file=self.out, flush=True)
        self.shown = None
