"""The build's commands with their output in a log file: the compiler's output and
warnings go there, the terminal gets one progress line; a failure shows the log's tail."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from llamaserve.config import ConfigError
from llamaserve.ops.progress import ProgressLine, percent_of

TAIL_LINES = 40


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a file, without their line ends."""
    with path.open(errors="replace") as f:
        return [line.rstrip("\n") for line in deque(f, maxlen=lines)]


class BuildLog:
    """One log file that a build's commands append to, one after another."""

    def __init__(self, path: Path, out: TextIO) -> None:
        self.path = path
        self.out = out
        path.parent.mkdir(parents=True, exist_ok=True)

    def run(
        self,
        step: str,
        args: Sequence[str],
        *,
        progress: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Run one step's command into the log; with `progress`, the percentages it prints
        on one line. A command that fails ends the install: the log's tail, then an error."""
        line = ProgressLine(self.out, f"llamaserve: {step}") if progress else None
        with self.path.open("a", buffering=1) as log:  # line-buffered: whole lines if killed
            log.write(f"$ {shlex.join(args)}\n")
            began = time.monotonic()
            with subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                text=True,
                errors="replace",
            ) as child:
                assert child.stdout is not None
                for text in child.stdout:
                    log.write(text)
                    if line and (percent := percent_of(text)) is not None:
                        line.update(percent)
            took = time.monotonic() - began
            log.write(f"[exit status {child.returncode} after {took:.0f} s]\n")
        if line:
            line.end()
        if child.returncode != 0:
            program = os.path.basename(args[0])
            self.fail(f"{step} failed ({program} exited with status {child.returncode})")

    def fail(self, reason: str) -> None:
        print(f"--- the last {TAIL_LINES} lines of {self.path} ---", file=self.out)
        for text in tail(self.path):
            print(text, file=self.out)
        print("---", file=self.out, flush=True)
        raise ConfigError(f"{reason}; the whole log: {self.path}")
