"""The `llamaserve` command line; console.sh, install.sh and the bin/ scripts wrap it."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from llamaserve.config import (
    ENGINES,
    ConfigError,
    Layout,
    Settings,
    base_layout,
    load_settings,
    protect_setting_files,
    unknown_settings,
)

EXAMPLES = """\
examples:
  llamaserve start              start the engine (and gateway) and wait until ready
  llamaserve status             state, pid, port, model, uptime and health (exit 3 when stopped)
  llamaserve logs -n 100        follow the engine log from its last 100 lines
  llamaserve users --help       manage users and API keys
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaserve",
        description="Serve one GGUF model over the OpenAI API.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("start", help="start the engine (and gateway) and wait until ready")
    commands.add_parser("stop", help="stop (SIGTERM, then SIGKILL after a timeout)")
    commands.add_parser("restart", help="stop, then start")
    commands.add_parser("status", help="show state, pid, port, model and uptime")
    logs = commands.add_parser("logs", help="follow a log")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines to show first")
    logs.add_argument("--no-follow", action="store_true", help="print and exit")
    logs.add_argument(
        "--service", choices=["engine", "gateway"], default="engine", help="whose log"
    )
    setup = commands.add_parser("install", help="the Python half of runtime/install.sh")
    setup.add_argument("--skip-engine", action="store_true", help="do not install llama.cpp")
    setup.add_argument(
        "--engine",
        action="append",
        choices=ENGINES,
        default=[],
        help="the engine to install and, in a new config.env, to run (default: the "
        "config's LLAMA_ENGINE, llama-server for a new one; llama-cpp-python is always "
        "installed)",
    )
    # Listed for --help only: main() hands `users ...` to users_cli before parsing.
    commands.add_parser("users", help="manage users and API keys (./bin/user_management_cli.sh)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["users"]:
        from llamaserve.ops.users import cli as users_cli

        return users_cli.main(argv[1:])
    try:
        if argv in (["serve-engine"], ["serve-gateway"]):  # the processes console.sh starts
            return serve(argv[0], *load_settings())
        sys.stdout = _Unread(sys.stdout)
        return run(build_parser().parse_args(argv))
    except ConfigError as exc:
        print(f"llamaserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Unread(io.TextIOBase):
    """stdout for a command whose reader may go (`status | head -1`): what it no longer
    reads is dropped, and the command still does all its work (a `stop` stops) and exits
    with its own code, without a BrokenPipeError."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with self._gone_quietly():
            self._stream.write(text)
            self._stream.flush()
        return len(text)

    def flush(self) -> None:
        with self._gone_quietly():
            self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @contextmanager
    def _gone_quietly(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:  # from now on, and for what is still buffered: nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())


def run(args: argparse.Namespace) -> int:
    from llamaserve.ops import console

    for warning in protect_setting_files(base_layout()):
        print(f"llamaserve: warning: {warning}", file=sys.stderr)
    if args.command == "logs":  # needs no settings: readable whatever the config says
        return console.logs(base_layout(), args.lines, not args.no_follow, args.service)
    if args.command == "stop":
        return console.stop(*_settings_to_stop())
    try:
        settings, layout = load_settings()
    except ConfigError as exc:
        if args.command == "restart":
            raise ConfigError(f"{exc} (nothing was stopped)") from None
        raise
    if args.command in ("start", "restart"):
        for warning in unknown_settings(layout):
            print(f"llamaserve: warning: {warning}", file=sys.stderr)
    match args.command:
        case "start":
            return console.start(settings, layout)
        case "restart":
            return console.restart(settings, layout)
        case "status":
            return console.status(settings, layout)
        case "install":
            return run_install(args.skip_engine, args.engine, layout)
    raise AssertionError(args.command)


def _settings_to_stop() -> tuple[Settings, Layout]:
    """The settings, or with a config that cannot be read, the defaults (said): what runs
    must always be stoppable, and stopping needs only the pidfiles and a timeout."""
    try:
        return load_settings()
    except ConfigError as exc:
        layout = base_layout()
        print(f"llamaserve: warning: {exc}; stopping with the default settings", file=sys.stderr)
        return Settings.model_construct(llama_runtime_dir=layout.runtime), layout


def run_install(skip_engine: bool, engines: list[str], layout: Layout) -> int:
    from llamaserve.ops import install

    if not skip_engine:
        install.ensure_engine(sys.stdout)
    named = list(dict.fromkeys(engines))
    install.ensure_config(layout, sys.stdout, engine=named[0] if len(named) == 1 else None)
    settings, layout = load_settings()
    wanted = named or [settings.llama_engine]
    if not skip_engine and "llama-server" in wanted and not settings.llama_server_bin:
        install.ensure_llama_server(sys.stdout)
    install.ensure_model(layout, settings.llama_model, sys.stdout)
    for engine in wanted:
        if engine != settings.llama_engine:
            print(f'\nTo run {engine}: LLAMA_ENGINE="{engine}" in {layout.config_file}')
    print("\nNext: ./console.sh start")
    return 0


def serve(command: str, settings: Settings, layout: Layout) -> int:
    if command == "serve-gateway":
        from llamaserve.gateway import server

        server.serve(settings, layout)
        return 0
    from llamaserve.engine.models import resolve_model

    model = resolve_model(settings, layout)
    if settings.llama_engine == "llama-server":
        from llamaserve.engine import llama_server

        return llama_server.serve(settings, layout, model)
    from llamaserve.engine import pyserver

    pyserver.serve(settings, model)
    return 0
