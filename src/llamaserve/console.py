"""The operator's console: start, stop, restart, status and logs of Llamaserve's processes."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from llamaserve.config import ConfigError, Layout, Settings
from llamaserve.engine.models import resolve_model
from llamaserve.engine.process import ProcessRecord, Service

EXIT_STOPPED = 3


@dataclass(frozen=True)
class Plan:
    """What `start` launches for one service, and how it knows that it is ready."""

    service: Service
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    headers: dict[str, str]
    host: str
    port: int
    info: dict[str, str | int]


def engine_service(layout: Layout) -> Service:
    return Service("engine", layout.run, layout.logs)


def services(layout: Layout) -> list[Service]:
    return [engine_service(layout)]


def plan_engine(settings: Settings, layout: Layout) -> Plan:
    """Check everything `start` can check before launching; ConfigError says what is wrong."""
    model = resolve_model(settings, layout)
    problem = settings.api_key_problem()
    if problem:
        raise ConfigError(f"{problem}: set it in {layout.config_file} (install.sh generates one)")
    env = {
        **os.environ,
        "LLAMASERVE_ROOT": str(layout.root),
        "LLAMA_RUNTIME_DIR": str(layout.runtime),
        "LLAMA_MODEL": str(model),
    }
    host, port = settings.llama_server_host, settings.llama_server_port
    return Plan(
        service=engine_service(layout),
        argv=[sys.executable, "-m", "llamaserve", "serve-engine"],
        env=env,
        ready_url=f"http://{connect_host(host)}:{port}/v1/models",
        headers={"Authorization": f"Bearer {settings.llama_server_api_key.get_secret_value()}"},
        host=host,
        port=port,
        info={"model": model.name, "host": host, "port": port, "engine": settings.llama_engine},
    )


def connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"port {port} on {host} is already in use ({exc.strerror})") from None


def start(settings: Settings, layout: Layout, out: TextIO = sys.stdout) -> int:
    plan = plan_engine(settings, layout)
    record = plan.service.running()
    if record is not None:
        print(f"llamaserve: {plan.service.name} is already running (pid {record.pid})", file=out)
        return 0
    check_port_free(plan.host, plan.port)
    if not launch(plan, settings.llama_start_timeout, settings.llama_stop_timeout, out):
        return 1
    print_ready(plan, layout, out)
    return 0


def launch(plan: Plan, timeout: float, stop_timeout: float, out: TextIO) -> bool:
    """Spawn the service and wait until it answers; on failure, show its log and clean up."""
    service = plan.service
    print(f"llamaserve: starting {service.name} (log: {service.logfile})", file=out, flush=True)
    began = time.monotonic()
    proc = service.spawn(plan.argv, env=plan.env, info=plan.info)
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            service.pidfile.unlink(missing_ok=True)
            _fail(
                out, f"{service.name} exited with status {proc.returncode} while starting", service
            )
            return False
        if _answers(plan):
            print(
                f"llamaserve: {service.name} ready in {time.monotonic() - began:.1f}s "
                f"(pid {proc.pid})",
                file=out,
            )
            return True
        time.sleep(0.25)
    service.stop(stop_timeout)
    _fail(out, f"{service.name} did not become ready within {timeout:.0f}s", service)
    return False


def _answers(plan: Plan) -> bool:
    try:
        return httpx.get(plan.ready_url, headers=plan.headers, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _fail(out: TextIO, message: str, service: Service) -> None:
    print(f"llamaserve: error: {message}; last lines of {service.logfile}:", file=out)
    print(service.tail(20), file=out)


def print_ready(plan: Plan, layout: Layout, out: TextIO) -> None:
    base = f"http://{connect_host(plan.host)}:{plan.port}/v1"
    model = plan.info["model"]
    config = os.path.relpath(layout.config_file)
    payload = (
        f'{{"model": "{model}", '
        '"messages": [{"role": "user", "content": "Say hello in one sentence."}]}'
    )
    print(f"  URL:   {base}  (listening on {plan.host}:{plan.port})", file=out)
    print(f"  model: {model}", file=out)
    print("  try:", file=out)
    print(f"    source {config}", file=out)
    print(
        f"    curl -s {base}/chat/completions "
        '-H "Authorization: Bearer $LLAMA_SERVER_API_KEY" '
        f"-H \"Content-Type: application/json\" -d '{payload}'",
        file=out,
    )


def stop(settings: Settings, layout: Layout, out: TextIO = sys.stdout) -> int:
    for service in reversed(services(layout)):
        was_running = service.stop(settings.llama_stop_timeout)
        state = "stopped" if was_running else "was not running"
        print(f"llamaserve: {service.name} {state}", file=out)
    return 0


def status(layout: Layout, out: TextIO = sys.stdout) -> int:
    code = 0
    for service in services(layout):
        record = service.running()
        if record is None:
            stale = " (stale pidfile)" if service.record() is not None else ""
            print(f"{service.name}: stopped{stale}", file=out)
            code = EXIT_STOPPED
        else:
            print(f"{service.name}: {_describe(record)}", file=out)
    return code


def _describe(record: ProcessRecord) -> str:
    info = record.info
    return (
        f"running, pid {record.pid}, {info.get('host')}:{info.get('port')}, "
        f"model {info.get('model')}, up {_duration(record.uptime)}"
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def logs(layout: Layout, lines: int, follow: bool, out: TextIO = sys.stdout) -> int:
    logfile: Path = engine_service(layout).logfile
    if not logfile.exists():
        print(f"llamaserve: no log yet ({logfile})", file=out)
        return 1
    if follow:
        os.execvp("tail", ["tail", "-n", str(lines), "-F", str(logfile)])
    print(engine_service(layout).tail(lines), file=out)
    return 0
