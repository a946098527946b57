"""Background processes owned by Llamaserve: a pidfile each, started, watched and stopped.

A pidfile records the process's start time as the kernel counts it, so that a
stale pidfile whose pid the system has since given to another program is
recognised and that program is never signalled.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class Stopped(enum.Enum):
    """What `Service.stop` found and did."""

    NOT_RUNNING = "was not running"
    STOPPED = "stopped"
    KILLED = "killed"


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_ticks: int
    started_at: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at)


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has finished; only its exit status is left
        return None
    return int(fields[19])


class Service:
    """One named background process with its pidfile and log file."""

    def __init__(self, name: str, run_dir: Path, log_dir: Path) -> None:
        self.name = name
        self.pidfile = run_dir / f"{name}.pid"
        self.logfile = log_dir / f"{name}.log"

    def record(self) -> ProcessRecord | None:
        try:
            return ProcessRecord(**json.loads(self.pidfile.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> ProcessRecord | None:
        """The record of our live process, or None (a stale pidfile counts as not running)."""
        record = self.record()
        if record is None or start_ticks(record.pid) != record.start_ticks:
            return None
        return record

    def spawn(
        self, argv: Sequence[str], *, env: dict[str, str], info: dict[str, Any]
    ) -> subprocess.Popen[bytes]:
        """Start argv detached from the terminal, output appended to the log file."""
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        ticks = start_ticks(proc.pid) or 0
        record = ProcessRecord(proc.pid, ticks, time.time(), info)
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        # Mode 600: the record names the settings the process runs with.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(json.dumps(asdict(record)))
        tmp.replace(self.pidfile)
        return proc

    def stop(self, timeout: float) -> Stopped:
        """SIGTERM, then SIGKILL (its whole group) if it is still running `timeout` seconds
        later."""
        record = self.running()
        if record is None:
            self.pidfile.unlink(missing_ok=True)
            return Stopped.NOT_RUNNING
        _signal(record, signal.SIGTERM)
        outcome = Stopped.STOPPED
        if not self._wait_gone(record, timeout):
            _signal(record, signal.SIGKILL, group=True)
            self._wait_gone(record, 5.0)
            outcome = Stopped.KILLED
        self.pidfile.unlink(missing_ok=True)
        return outcome

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @staticmethod
    def _wait_gone(record: ProcessRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if start_ticks(record.pid) != record.start_ticks:
                return True
            time.sleep(0.1)
        return False


def _signal(record: ProcessRecord, sig: signal.Signals, group: bool = False) -> None:
    """Signal our process, or with `group` its whole process group (`spawn` makes it the
    leader of a session of its own): a child it started, such as the engine's llama-server,
    must not outlive a SIGKILL of its parent."""
    # Re-check identity right before signalling: the pid may have been reused meanwhile.
    if start_ticks(record.pid) == record.start_ticks:
        with contextlib.suppress(ProcessLookupError):
            if group and os.getpgid(record.pid) == record.pid:
                os.killpg(record.pid, sig)
            else:
                os.kill(record.pid, sig)
