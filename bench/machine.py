"""What a result was measured on: the machine, the engine's build and its thread settings.

The engine's build is read from the processes that actually ran: the executables in
the process tree under the engine's pidfile (`llama-server --version` for that engine),
and their command lines with the engine key masked.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import cpu
from bench.stack import ROOT, Stack
from llamaserve.config import Settings

KEY_MASK = "<engine key>"


def machine() -> dict[str, Any]:
    meminfo = _read("/proc/meminfo")
    total_kib = next((int(line.split()[1]) for line in meminfo.splitlines()
                      if line.startswith("MemTotal:")), 0)  # fmt: skip
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(total_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "tree_modified": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def threads(settings: Settings) -> dict[str, Any]:
    """The thread settings as configured, and what they come to on this machine."""
    return {
        "LLAMA_N_THREADS": settings.llama_n_threads,
        "LLAMA_N_THREADS_BATCH": settings.llama_n_threads_batch,
        "LLAMA_PARALLEL": getattr(settings, "llama_parallel", None),
        "LLAMA_N_CTX": settings.llama_n_ctx,
        "LLAMA_PROXY_RESERVED_SLOTS": settings.llama_proxy_reserved_slots,
        "generation_threads": settings.threads(),
        "batch_threads": settings.threads_batch(),
    }


def engine_build(stack: Stack) -> dict[str, Any]:
    """Versions and command lines of the engine processes that are running now."""
    build: dict[str, Any] = {"llama_cpp_python": _version("llama_cpp_python")}
    for pid in _engine_tree(stack):
        exe = _exe(pid)
        argv = _cmdline(pid, stack.engine_key)
        build.setdefault("processes", []).append({"exe": exe, "argv": argv})
        if exe and Path(exe).name == "llama-server":
            build["llama_server"] = _command_output([exe, "--version"])
    return build


def _engine_tree(stack: Stack) -> list[int]:
    """The engine's pid and all its descendants."""
    try:
        root = json.loads((stack.runtime / "run" / "engine.pid").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return []
    return cpu.tree(int(root))


def _exe(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/exe")
    return None


def _cmdline(pid: int, secret: str) -> list[str]:
    raw = _read(f"/proc/{pid}/cmdline")
    return [KEY_MASK if secret in arg else arg for arg in raw.split("\0") if arg]


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    return _command_output(["git", "-C", str(ROOT), *args])


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"({exc.strerror})"
    return (done.stdout + done.stderr).strip()


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
