"""A private Llamaserve for the benchmark, set up the way the README tells a user to.

A temporary runtime directory with its own config.env (engine and gateway on loopback
ports), the private PostgreSQL cluster (`bootstrap_user_cli.sh`, `init-db`), users made
(and, if asked, metered: a token quota and rate limit) with `user_management_cli.sh`, and
engines started with `console.sh start`. Extra processes (the mock engine, a gateway in
front of it) are spawned with a log file each and always stopped. Nothing here touches
the checkout's own runtime/.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llamaserve.config import Settings, load_settings, new_engine_key
from llamaserve.ops.readiness import Start, wait_until_ready
from llamaserve.store import db

ROOT = Path(__file__).resolve().parents[1]
# The user's own choices that carry over into the benchmark's config.env.
PASSTHROUGH = (
    "LLAMA_MODEL",
    "LLAMA_CHAT_FORMAT",
    "LLAMA_N_CTX",
    "LLAMA_N_THREADS",
    "LLAMA_N_THREADS_BATCH",
    "LLAMA_N_GPU_LAYERS",
    "LLAMA_SERVER_BIN",
    "LLAMA_PROXY_RESERVED_SLOTS",
)
GENEROUS_LIMIT = "1000000"  # requests per minute: rate limiting on, never triggered
# A token quota (per day) and tokens per minute: metered, never refused (see `meter_user`).
GENEROUS_QUOTA = "1000000000000"
GENEROUS_TOKEN_RATE = "1000000000"


@dataclass(frozen=True)
class Running:
    """A process of the benchmark's own that answers at `url`."""

    url: str
    pid: int


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def guarded(program: str, run: Callable[[], int]) -> int:
    """A benchmark program's exit status: SIGTERM stops it as Ctrl-C does (its stack is
    stopped on the way out), a BenchError is one line and 1, an interruption one line
    and 130, never a traceback."""
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        return run()
    except BenchError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted; its stack is stopped", file=sys.stderr)
        return 130


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def take_environment() -> dict[str, str]:
    """The user's settings that carry over (PASSTHROUGH); then none are left to leak into
    this process's own reading of the stack's settings."""
    passthrough = {name: os.environ[name] for name in PASSTHROUGH if name in os.environ}
    for name in list(os.environ):
        if name.startswith(("LLAMA_", "POSTGRES_")):
            del os.environ[name]
    return passthrough


def isolated_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment for the stack's commands: none of the caller's Llamaserve settings."""
    env = {k: v for k, v in environ.items() if not k.startswith(("LLAMA_", "POSTGRES_"))}
    env.pop("LLAMASERVE_ROOT", None)
    return env


class Stack:
    """One temporary installation: config, database, users, engine and gateway."""

    def __init__(self, base: Path, passthrough: dict[str, str]) -> None:
        self.base = base
        self.runtime = base / "runtime"
        self.engine_key = new_engine_key()
        self.engine_port, self.gateway_port = free_port(), free_port()
        self.env = isolated_environment(dict(os.environ))
        self.env["LLAMA_RUNTIME_DIR"] = str(self.runtime)
        self.config = {
            "LLAMA_SERVER_API_KEY": self.engine_key,
            "LLAMA_SERVER_HOST": "127.0.0.1",
            "LLAMA_SERVER_PORT": str(self.engine_port),
            "LLAMA_PROXY_ENABLED": "1",
            "LLAMA_PROXY_HOST": "127.0.0.1",
            "LLAMA_PROXY_PORT": str(self.gateway_port),
            "LLAMA_SERVER_BACKEND_URL": self.engine_url,
            "LLAMA_PROXY_RATE_LIMIT": GENEROUS_LIMIT,
            # The private cluster, whatever the checkout's own .env says.
            "POSTGRES_AUTH_HOST": "",
            "POSTGRES_AUTH_DB": "llamaserve",
            "POSTGRES_AUTH_USER": "llamaserve",
            **passthrough,
        }

    @classmethod
    def create(cls, passthrough: dict[str, str]) -> Stack:
        """A new stack with its database initialised (about two seconds)."""
        # PostgreSQL runs as the `postgres` user when we are root: it must reach the runtime.
        base = Path(tempfile.mkdtemp(prefix="llamaserve-bench-"))
        base.chmod(0o755)
        stack = cls(base, passthrough)
        stack.write_config()
        stack.run("bin/bootstrap_user_cli.sh")
        stack.run("bin/user_management_cli.sh", "init-db")
        return stack

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def write_config(self, **values: str) -> None:
        """config.env from the template, with the stack's values and these."""
        self.config.update(values)
        self.runtime.mkdir(parents=True, exist_ok=True)
        template = (ROOT / "runtime" / "config.env.template").read_text().splitlines()
        lines = [line for line in template if line.split("=", 1)[0] not in self.config]
        lines += [f'{key}="{value}"' for key, value in self.config.items()]
        path = self.runtime / "config.env"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def public_config(self) -> dict[str, str]:
        """The config.env values the stack set, without the engine key."""
        return {k: v for k, v in self.config.items() if k != "LLAMA_SERVER_API_KEY"}

    def settings(self) -> Settings:
        return load_settings(ROOT, runtime=self.runtime)[0]

    def run(self, script: str, *args: str, timeout: float = 600) -> str:
        """Run one of the project's scripts; its output, or BenchError with it."""
        result = subprocess.run(
            [str(ROOT / script), *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise BenchError(f"{script} {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def create_user(self, name: str) -> str:
        """A user with a generous rate limit; returns their key."""
        out = self.run(
            "bin/user_management_cli.sh", "create-user", "--username", name,
            "--rate-limit", GENEROUS_LIMIT, "--window", "60", "--json",
        )  # fmt: skip
        return str(json.loads(out)["key"])

    def meter_user(self, name: str) -> None:
        """A token quota and a token rate limit for the user, too large to refuse anything:
        each of their requests pays for the reservation and the charge."""
        users = "bin/user_management_cli.sh"
        self.run(users, "set-quota", "--username", name, "--tokens", GENEROUS_QUOTA, "--per", "day")
        self.run(users, "set-limits", "--username", name, "--token-rate-limit", GENEROUS_TOKEN_RATE)

    def start(self, engine: str, parallel: int) -> None:
        """`console.sh start` of the engine, the database and the gateway."""
        self.write_config(LLAMA_ENGINE=engine, LLAMA_PARALLEL=str(parallel))
        self.run("console.sh", "start")

    def model_id(self) -> str:
        """The id of the model the engine serves (its file name)."""
        headers = {"Authorization": f"Bearer {self.engine_key}"}
        answer = httpx.get(f"{self.engine_url}/v1/models", headers=headers, timeout=30)
        answer.raise_for_status()
        return str(answer.json()["data"][0]["id"])

    def engine_slots(self) -> int:
        """The slots the engine runs, as its /health says (1 if it does not say)."""
        health = httpx.get(f"{self.engine_url}/health", timeout=30).json()
        return int(health.get("slots") or 1)

    def stop(self) -> None:
        self.run("console.sh", "stop")

    def destroy(self, keep: bool, logs_to: Path) -> None:
        """Stop everything, keep a copy of the logs, and remove the directory unless `keep`."""
        try:
            self.stop()
        finally:
            shutil.copytree(self.runtime / "logs", logs_to, dirs_exist_ok=True)
            if not keep:
                shutil.rmtree(self.base, ignore_errors=True)

    def log_rows(self, request_ids: list[str], wait: float = 15.0) -> dict[str, dict[str, Any]]:
        """The llama_requests rows of these requests, once the gateway has written them
        (it writes in batches, every 0.2 s); fewer if some never come within `wait`."""
        deadline = time.monotonic() + wait
        while True:
            rows = asyncio.run(self._fetch_rows(request_ids))
            if len(rows) >= len(set(request_ids)) or time.monotonic() > deadline:
                return rows
            time.sleep(0.5)

    async def _fetch_rows(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        settings, layout = load_settings(ROOT, runtime=self.runtime)
        conn = await db.connect(settings, layout)
        try:
            records = await conn.fetch(
                "SELECT request_id, status, outcome, queue_ms, ttft_ms, completion_tokens, engine "
                "FROM llama_requests WHERE request_id = ANY($1::text[])",
                request_ids,
            )
        finally:
            await conn.close()
        return {r["request_id"]: dict(r) for r in records}

    def pids(self) -> list[int]:
        """The roots of the benchmark's own processes: itself (and what it spawned), and
        the engine, gateway and database that console.sh started."""
        found = [os.getpid(), *self.service_pids().values()]
        postgres = self.postgres_pid()
        return found if postgres is None else [*found, postgres]

    def service_pids(self) -> dict[str, int]:
        """The engine's and the gateway's pids, as console.sh recorded them."""
        found = {}
        for name in ("engine", "gateway"):
            with suppress(OSError, ValueError, KeyError):
                found[name] = json.loads((self.runtime / "run" / f"{name}.pid").read_text())["pid"]
        return found

    def postgres_pid(self) -> int | None:
        """The private cluster's postmaster (its first line of postmaster.pid)."""
        try:
            return int((self.runtime / "pgdata" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @contextmanager
    def process(self, name: str, argv: list[str], ready_url: str, **env: str) -> Iterator[int]:
        """A process of the benchmark's own (log in runtime/logs/NAME.log), stopped on exit;
        its pid."""
        log_path = self.runtime / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env={**self.env, **env}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            _wait_ready(ready_url, proc, log_path)
            yield proc.pid
        finally:
            _terminate(proc)

    @contextmanager
    def gateway_to(self, backend_url: str, **settings: str) -> Iterator[Running]:
        """A gateway process on the stack's database in front of `backend_url`, with
        these settings (environment variables) beside the stack's."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "llamaserve", "serve-gateway"]
        env = {"LLAMA_PROXY_PORT": str(port), "LLAMA_SERVER_BACKEND_URL": backend_url}
        with self.process("bench-gateway", argv, url + "/ready", **env, **settings) as pid:
            yield Running(url, pid)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    start = wait_until_ready(url, proc, 60)
    if start is Start.EXITED:
        raise BenchError(f"{proc.args!r} exited while starting; see {log_path}")
    if start is Start.TIMED_OUT:
        _terminate(proc)
        raise BenchError(f"{url} did not answer within 60 s; see {log_path}")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
