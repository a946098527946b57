"""Runs llama.cpp's `llama-server` for one model, behind the relay (LLAMA_ENGINE=llama-server).

This module is the engine process itself (`llamaserve serve-engine`): our Python process
keeps the pidfile and the public port, and runs llama-server as its child on a private
loopback port. The key reaches llama-server in a mode-600 file, never on its command
line (which every user of the machine can read). The child dies with us: it is stopped
at shutdown and killed by the kernel if we are; and if it dies, we exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaserve.config import ConfigError, Layout, Settings
from llamaserve.engine.models import model_created
from llamaserve.engine.sizing import Sizing, size_for

if TYPE_CHECKING:
    from llamaserve.engine.bridge import ApiBridge

# llama-cpp-python's chat format names whose llama.cpp template has another name.
TEMPLATE_NAMES = {
    "llama-2": "llama2",
    "llama-3": "llama3",
    "mistral-instruct": "mistral-v1",
    "chatml-function-calling": "chatml",
    "qwen": "chatml",
}
# Secrets of ours that the child has no use for.
PRIVATE_VARIABLES = ("LLAMA_SERVER_API_KEY", "LLAMA_API_KEY", "POSTGRES_AUTH_PASSWORD")
PR_SET_PDEATHSIG = 1
# Where install.sh records, in the virtual environment, the llama-server it provided.
INSTALLED_MARKER = "llamaserve-llama-server"


def installed_llama_server() -> Path | None:
    """The llama-server that install.sh provided last, if it recorded one."""
    try:
        recorded = (Path(sys.prefix) / INSTALLED_MARKER).read_text().strip()
    except OSError:
        return None
    return Path(recorded) if recorded else None


def find_binary(settings: Settings, root: Path) -> Path:
    """The llama-server to run, or a ConfigError naming the two ways to provide one."""
    chosen = (
        Path(settings.llama_server_bin) if settings.llama_server_bin else installed_llama_server()
    )
    binary = root / chosen.expanduser() if chosen else None
    if binary is None or not (binary.is_file() and os.access(binary, os.X_OK)):
        where = f"at {binary}" if binary else "installed"
        raise ConfigError(
            f"LLAMA_ENGINE=llama-server but there is no llama-server {where}: "
            "run ./runtime/install.sh --engine llama-server, or set LLAMA_SERVER_BIN "
            "to a llama-server binary"
        )
    return binary


def template_args(chat_format: str) -> list[str]:
    """llama-server's flags for LLAMA_CHAT_FORMAT; empty = the model's own template."""
    if not chat_format:
        return []
    # Without --no-jinja a template name would be read as the text of a jinja template.
    return ["--no-jinja", "--chat-template", TEMPLATE_NAMES.get(chat_format, chat_format)]


def build_argv(
    settings: Settings,
    model: Path,
    *,
    binary: Path,
    port: int,
    key_file: Path,
    sizing: Sizing | None = None,
) -> list[str]:
    gpu_layers = "all" if settings.llama_n_gpu_layers < 0 else str(settings.llama_n_gpu_layers)
    sizing = sizing or size_for(settings, model)
    return [
        str(binary),
        *("--model", str(model), "--alias", model.name),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--api-key-file", str(key_file)),
        "--no-webui",
        *slot_args(sizing),
        *("--threads", str(settings.threads()), "--threads-batch", str(settings.threads_batch())),
        # Idle threads sleep rather than spin (llama.cpp polls by default): as fast alone,
        # and far faster beside other busy processes (see docs/operations.md, "Threads").
        *("--poll", "0"),
        *("--n-gpu-layers", gpu_layers),
        *template_args(settings.llama_chat_format),
    ]


def slot_args(sizing: Sizing) -> list[str]:
    """The slots, and the one KV pool they share (-c: all slots together), each request
    bounded to its share, sliding-window layers kept whole (see `engine/sizing.py`)."""
    per_slot = ["--kv-unified-per-slot", str(sizing.per_slot)] if sizing.per_slot else []
    windows = ["--swa-full"] if sizing.full_windows else []
    return ["--parallel", str(sizing.slots), "--kv-unified", "--ctx-size", str(sizing.pool),
            *per_slot, *windows]  # fmt: skip


def write_key_file(path: Path, key: str) -> Path:
    """The key in a file only its owner can read, for --api-key-file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the file may have existed with another mode
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path


def free_loopback_port(avoid: int) -> int:
    """A port for llama-server; never the launcher's own, which is not bound yet."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != avoid:
            return port


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel kills it if the launcher dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """llama-server as our child process: started, watched, stopped."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES}
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        # Its output goes to our stdout, the engine log.
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec
        )

    async def watch(self, on_exit: Callable[[int], None]) -> None:
        """Call on_exit with the exit status if the child ends (cancel to stop watching)."""
        assert self.proc is not None
        while (status := self.proc.poll()) is None:
            await asyncio.sleep(0.2)
        on_exit(status)

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Launcher:
    """llama-server as our child, and the relay in front of it, until one of them stops."""

    def __init__(self, settings: Settings, layout: Layout, model: Path) -> None:
        self.settings = settings
        self.model = model
        self.binary = find_binary(settings, layout.root)
        self.port = free_loopback_port(avoid=settings.llama_server_port)
        key = settings.llama_server_api_key.get_secret_value()
        self.key_file = write_key_file(layout.run / "llama-server.key", key)
        self.sizing = size_for(settings, model)
        argv = build_argv(settings, model, binary=self.binary, port=self.port,
                          key_file=self.key_file, sizing=self.sizing)  # fmt: skip
        self.child = Child(argv)
        self.failed = False
        self._watcher: asyncio.Task[None] | None = None
        self._server: Any = None

    def run(self) -> int:
        """Serve until stopped; 1 if llama-server died."""
        from llamaserve.engine import serving

        self._server = serving.serve(
            self.relay(),
            host=self.settings.llama_server_host,
            port=self.settings.llama_server_port,
            grace=self.settings.stop_grace(),
            header_timeout=self.settings.llama_header_timeout,
        )
        print(_banner(self.settings, self.model, self.binary, self.port, self.sizing), flush=True)
        self._server.run()
        return 1 if self.failed else 0

    def relay(self) -> ApiBridge:
        """The front: the relay to llama-server, with the Responses and Messages APIs."""
        from llamaserve.engine.bridge import ApiBridge
        from llamaserve.engine.relay import Relay
        from llamaserve.engine.room import Room

        relay = Relay(
            upstream_url=f"http://127.0.0.1:{self.port}",
            api_key=self.settings.llama_server_api_key,
            model_id=self.model.name,
            created=model_created(self.model),
            slots=self.sizing.slots,
            native_tools=not self.settings.llama_chat_format,
            room=Room(self.sizing.pool, self.sizing.per_slot) if self.sizing.per_slot else None,
            on_startup=self.startup,
            on_shutdown=self.shutdown,
        )
        return ApiBridge(
            relay, api_key=self.settings.llama_server_api_key, model_id=self.model.name
        )

    async def startup(self) -> None:
        try:
            self.child.start()
        except OSError:
            self.failed = True  # uvicorn reports the failed startup, then returns
            raise
        self._watcher = asyncio.create_task(self.child.watch(self._child_exited))

    async def shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.child.stop(timeout=5.0)
        with contextlib.suppress(OSError):
            self.key_file.unlink()

    def _child_exited(self, status: int) -> None:
        print(f"llamaserve engine: llama-server exited with status {status}", flush=True)
        self.failed = True
        self._server.should_exit = True


def serve(settings: Settings, layout: Layout, model: Path) -> int:
    """Run llama-server and the relay until stopped; non-zero if llama-server died."""
    return Launcher(settings, layout, model).run()


def _banner(settings: Settings, model: Path, binary: Path, port: int, sizing: Sizing) -> str:
    template = settings.llama_chat_format or "the model's own (jinja)"
    return (
        f"llamaserve engine: llama-server ({binary}) on 127.0.0.1:{port}, model {model.name}, "
        f"{sizing.describe()}, "
        f"threads {settings.threads()}/{settings.threads_batch()}, chat template {template}"
    )
