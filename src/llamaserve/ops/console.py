"""The operator's console: start, stop, restart, status and logs of Llamaserve's processes."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from pydantic import SecretStr

from llamaserve.config import ConfigError, Layout, Settings, is_engine_url, split_urls
from llamaserve.engine import llama_server
from llamaserve.engine.models import resolve_model
from llamaserve.engine.sizing import size_for
from llamaserve.logs import private_log
from llamaserve.ops import cluster
from llamaserve.ops.process import ProcessRecord, Service, Stopped
from llamaserve.ops.readiness import Answer, Start, ask, wait_until_ready
from llamaserve.store import db

EXIT_STOPPED = 3


@dataclass(frozen=True)
class Plan:
    """What `start` launches for one service, and how it knows that it is ready."""

    service: Service
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    key: SecretStr | None  # the bearer token its ready_url wants
    host: str
    port: int
    info: dict[str, Any]  # recorded with the process (see `_already_running`)
    note: str = ""  # said as it starts


LOOPBACK = ("127.0.0.1", "::1", "localhost")
NOTICE = 10.0  # seconds of waiting for a service before start says what it waits for
STATUS_TIMEOUT = 5.0  # seconds status waits for a service or engine to answer


def engine_service(layout: Layout) -> Service:
    return Service("engine", layout.run, layout.logs)


def gateway_service(layout: Layout) -> Service:
    return Service("gateway", layout.run, layout.logs)


def services(layout: Layout) -> list[Service]:
    """In start order; stopped in reverse."""
    return [engine_service(layout), gateway_service(layout)]


def enabled_services(settings: Settings, layout: Layout) -> list[Service]:
    """What this machine runs, in start order: the engine unless LLAMA_ENGINE_ENABLED=0,
    the gateway with LLAMA_PROXY_ENABLED=1."""
    return [service for service, enabled in (
        (engine_service(layout), settings.llama_engine_enabled),
        (gateway_service(layout), settings.llama_proxy_enabled),
    ) if enabled]  # fmt: skip


def plans(settings: Settings, layout: Layout) -> list[Plan]:
    """Check everything `start` can check before launching anything; ConfigError says
    what is wrong."""
    if not settings.llama_engine_enabled and not settings.llama_proxy_enabled:
        raise ConfigError(
            f"LLAMA_ENGINE_ENABLED=0 and LLAMA_PROXY_ENABLED=0 in {layout.config_name}: "
            "nothing to run on this machine"
        )
    problem = settings.api_key_problem()  # the engine's key, and the gateway's to engines
    if problem:
        raise ConfigError(f"{problem}: set it in {layout.config_file} (install.sh generates one)")
    found = [plan_engine(settings, layout)] if settings.llama_engine_enabled else []
    if settings.llama_proxy_enabled:
        found.append(plan_gateway(settings, layout))
    return found


def plan_engine(settings: Settings, layout: Layout) -> Plan:
    model = resolve_model(settings, layout)
    env = _child_env(layout, LLAMA_MODEL=str(model))
    note = ""
    if settings.llama_engine == "llama-server":
        llama_server.find_binary(settings, layout.root)
        sizing = size_for(settings, model)
        env["LLAMA_PARALLEL"] = str(sizing.slots)  # the engine sized as said here
        note = f"llama-server, {sizing.describe()}"
    host, port = settings.llama_server_host, settings.llama_server_port
    return Plan(
        service=engine_service(layout),
        argv=[sys.executable, "-m", "llamaserve", "serve-engine"],
        env=env,
        ready_url=f"http://{connect_host(host)}:{port}/v1/models",
        key=settings.llama_server_api_key,
        host=host,
        port=port,
        info={
            "model": model.name,
            "host": host,
            "port": port,
            "engine": settings.llama_engine,
            **_settings_record(settings, "engine"),
        },
        note=note,
    )


def plan_gateway(settings: Settings, layout: Layout) -> Plan:
    host = settings.llama_server_host
    if settings.llama_engine_enabled and _bypassable(settings, host):
        raise ConfigError(
            f"LLAMA_PROXY_ENABLED=1 but the engine would listen on {host}, where users could "
            f'bypass the gateway: set LLAMA_SERVER_HOST="127.0.0.1" in {layout.config_name} '
            '(or LLAMA_PROXY_ALLOW_PUBLIC_ENGINE="1" to accept that)'
        )
    urls = settings.backend_urls()
    if not urls:
        raise ConfigError("LLAMA_SERVER_BACKEND_URL is empty: set the engine URL(s) to forward to")
    for url in urls:
        if not is_engine_url(url):
            raise ConfigError(
                f"LLAMA_SERVER_BACKEND_URL: {url!r} is not an engine URL; "
                "write http://host:port (or https://), several separated by commas"
            )
    proxy_host, port = settings.llama_proxy_host, settings.llama_proxy_port
    return Plan(
        service=gateway_service(layout),
        argv=[sys.executable, "-m", "llamaserve", "serve-gateway"],
        env=_child_env(layout),
        ready_url=f"http://{connect_host(proxy_host)}:{port}/ready",
        key=None,
        host=proxy_host,
        port=port,
        info={
            "host": proxy_host,
            "port": port,
            "backend": settings.llama_server_backend_url,
            **_settings_record(settings, "gateway"),
        },
    )


# Settings a service's record shows otherwise (its address, model, engine, backends), or
# that only the console reads.
_NOT_COMPARED = {
    "llama_server_host", "llama_server_port", "llama_model", "llama_engine",
    "llama_proxy_host", "llama_proxy_port", "llama_server_backend_url",
    "llama_start_timeout", "llama_runtime_dir", "llama_engine_enabled",
}  # fmt: skip
_SHARED = {"llama_server_api_key", "llama_stop_timeout"}


def _settings_record(settings: Settings, service: str) -> dict[str, Any]:
    salt = secrets.token_hex(16)
    return {"salt": salt, "settings": settings_of(settings, service, salt)}


def settings_of(settings: Settings, service: str, salt: str) -> dict[str, str]:
    """The settings a service runs with, by name, so that `start` can tell which changed
    since it started; a secret only as a fingerprint salted with the record's own salt
    (no table of common passwords' hashes finds it)."""
    values = {}
    for name in Settings.model_fields:
        of_gateway = name.startswith(("llama_proxy_", "postgres_"))
        if name in _NOT_COMPARED or (of_gateway != (service == "gateway") and name not in _SHARED):
            continue
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = hashlib.sha256((salt + value.get_secret_value()).encode()).hexdigest()[:12]
        values[name.upper()] = str(value)
    return values


def _bypassable(settings: Settings, engine_host: str) -> bool:
    """An engine on this host could be reached around the gateway."""
    return engine_host not in LOOPBACK and not settings.llama_proxy_allow_public_engine


def unused_engine_warning(settings: Settings, layout: Layout) -> str | None:
    """A warning when the gateway would not forward to the engine this console starts:
    most often LLAMA_SERVER_PORT changed and LLAMA_SERVER_BACKEND_URL did not."""
    host, port = settings.llama_server_host, settings.llama_server_port
    names = {host}
    if host in (*LOOPBACK, "0.0.0.0", "::", ""):
        names.update(LOOPBACK)  # the engine answers on loopback under any of its names
    for url in settings.backend_urls():
        parsed = urlsplit(url)
        if parsed.hostname in names and (parsed.port or 80) == port:
            return None
    return (
        f"LLAMA_SERVER_BACKEND_URL ({settings.llama_server_backend_url}) does not include the "
        f"engine this console starts ({connect_host(host)}:{port}): the gateway will not use "
        f'it. Set LLAMA_SERVER_BACKEND_URL="http://{connect_host(host)}:{port}" in '
        f"{layout.config_name} unless that is what you want."
    )


def _child_env(layout: Layout, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "LLAMASERVE_ROOT": str(layout.root),
        "LLAMA_RUNTIME_DIR": str(layout.runtime),
        **extra,
    }


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
    """Start what is not running yet: the engine, then the database and gateway if enabled."""
    planned = plans(settings, layout)
    if settings.llama_proxy_enabled and settings.llama_engine_enabled:
        warning = unused_engine_warning(settings, layout)
        if warning:
            print(f"llamaserve: warning: {warning}", file=out)
    pending = [plan for plan in planned if not _already_running(plan, settings, layout, out)]
    for plan in pending:
        check_port_free(plan.host, plan.port)
    for plan in pending:
        if plan.service.name == "gateway" and db.is_private(settings):
            cluster.ensure_running(settings, layout)
        if not launch(plan, settings.llama_start_timeout, settings.llama_stop_timeout, out):
            return 1
    print_ready(planned[-1], layout, out)
    return 0


def _already_running(plan: Plan, settings: Settings, layout: Layout, out: TextIO) -> bool:
    """Whether the service runs; said, with how it differs from the config. ConfigError
    when the gateway is to start in front of a running engine users could reach around it."""
    record = plan.service.running()
    if record is None:
        return False
    name = plan.service.name
    print(f"llamaserve: {name} is already running (pid {record.pid})", file=out)
    stale = {key: record.info.get(key) for key, value in plan.info.items()
             if key not in ("settings", "salt") and record.info.get(key) != value}  # fmt: skip
    ran_with = record.info.get("settings")  # none in the records of older versions
    now = settings_of(settings, name, str(record.info.get("salt", "")))
    changed = [] if not isinstance(ran_with, dict) else [
        setting for setting, value in now.items() if ran_with.get(setting) != value
    ]  # fmt: skip
    if not stale and not changed:
        return True
    running = ", ".join(
        [f"{key} {value}" for key, value in stale.items()]
        + ([f"other values of {', '.join(changed)}"] if changed else [])
    )
    moved = name == "engine" and "host" in stale and settings.llama_proxy_enabled
    if moved and _bypassable(settings, str(stale["host"])):
        raise ConfigError(
            f"the engine is running on {stale['host']}, where users could bypass the "
            f"gateway: run ./console.sh restart to start it as {layout.config_name} says"
        )
    print(
        f"llamaserve: warning: the {name} runs with {running}, not as the settings now say "
        f"({layout.config_name}, .env or the environment): ./console.sh restart applies them",
        file=out,
    )
    return True


def launch(plan: Plan, timeout: float, stop_timeout: float, out: TextIO) -> bool:
    """Spawn the service and wait until it answers; on failure, show its log and clean up."""
    service = plan.service
    print(f"llamaserve: starting {service.name} (log: {service.logfile})", file=out, flush=True)
    if plan.note:
        print(f"llamaserve: {service.name}: {plan.note}", file=out, flush=True)
    began = time.monotonic()
    private_log(service.logfile)
    proc = service.spawn(plan.argv, env=plan.env, info=plan.info)
    start = wait_until_ready(
        plan.ready_url, proc, min(timeout, NOTICE), key=plan.key, interval=0.25
    )
    if start is Start.TIMED_OUT and timeout > NOTICE:  # say what it waits for
        reason = ask(plan.ready_url, plan.key).why_not
        print(
            f"llamaserve: {service.name} not ready yet ({reason}); waiting up to {timeout:.0f}s",
            file=out,
            flush=True,
        )
        start = wait_until_ready(
            plan.ready_url, proc, timeout - NOTICE, key=plan.key, interval=0.25
        )
    if start is Start.READY:
        print(
            f"llamaserve: {service.name} ready in {time.monotonic() - began:.1f}s (pid {proc.pid})",
            file=out,
        )
        return True
    if start is Start.EXITED:
        service.pidfile.unlink(missing_ok=True)
        _fail(out, f"{service.name} exited with status {proc.returncode} while starting", service)
        return False
    service.stop(stop_timeout)
    proc.wait()  # stopped (killed at worst): reaped
    _fail(out, f"{service.name} did not become ready within {timeout:.0f}s", service)
    return False


def _fail(out: TextIO, message: str, service: Service) -> None:
    print(f"llamaserve: error: {message}; last lines of {service.logfile}:", file=out)
    print(service.tail(20), file=out)


def print_ready(plan: Plan, layout: Layout, out: TextIO) -> None:
    base = f"http://{connect_host(plan.host)}:{plan.port}/v1"
    if plan.service.name == "gateway":
        print(f"  URL:   {base}  (gateway; each user calls it with their own key)", file=out)
        print(f'  try:   curl -s {base}/models -H "Authorization: Bearer <USER_KEY>"', file=out)
        return
    model = plan.info["model"]
    config = os.path.relpath(layout.config_file)
    payload = (
        f'{{"model": "{model}", '
        '"messages": [{"role": "user", "content": "Say hello in one sentence."}], '
        '"max_tokens": 64}'
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


def restart(settings: Settings, layout: Layout, out: TextIO = sys.stdout) -> int:
    """Stop, then start; a config that `start` would refuse stops nothing, nor does a
    port that another program holds (one of ours is freed by the stop)."""
    try:
        planned = plans(settings, layout)
        ours = {r.info.get("port") for s in services(layout) if (r := s.running()) is not None}
        for plan in planned:
            if plan.port not in ours:
                check_port_free(plan.host, plan.port)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (nothing was stopped)") from None
    stop(settings, layout, out)
    return start(settings, layout, out)


def stop(settings: Settings, layout: Layout, out: TextIO = sys.stdout) -> int:
    enabled = [service.name for service in enabled_services(settings, layout)]
    timeout = settings.llama_stop_timeout
    for service in reversed(services(layout)):
        stopped = service.stop(timeout)
        if stopped is Stopped.KILLED:
            print(
                f"llamaserve: warning: {service.name} killed: still running {timeout:g}s after "
                f"SIGTERM (LLAMA_STOP_TIMEOUT); its log: {service.logfile}",
                file=out,
            )
        elif stopped is Stopped.STOPPED or service.name in enabled:
            print(f"llamaserve: {service.name} {stopped.value}", file=out)
    if cluster.stop(layout, timeout):
        print("llamaserve: database stopped", file=out)
    return 0


def status(settings: Settings, layout: Layout, out: TextIO = sys.stdout) -> int:
    """One line per process, whether it answers, then one per engine the gateway sends
    to; exit 0 when everything enabled runs, 3 otherwise."""
    code = 0
    expected = enabled_services(settings, layout)
    lines: dict[str, str] = {}
    questions: dict[str, str] = {}  # what to ask, by line
    for service in expected:
        record = service.running()
        if record is None:
            stale = " (stale pidfile)" if service.record() is not None else ""
            lines[service.name] = f"stopped{stale}"
            code = EXIT_STOPPED
        else:
            lines[service.name] = _describe(record)
            path = "/ready" if service.name == "gateway" else "/health"
            host = connect_host(str(record.info.get("host")))
            questions[service.name] = f"http://{host}:{record.info.get('port')}{path}"
    if settings.llama_proxy_enabled and db.is_private(settings):
        lines["database"] = f"{cluster.status(layout) or 'stopped'} (private cluster)"
    if settings.llama_proxy_enabled:
        gateway = gateway_service(layout).running()  # its engines as it was started
        backends = gateway.info.get("backend") if gateway else None
        for url in split_urls(backends) if backends else settings.backend_urls():
            name = f"backend {url}"
            lines[name], questions[name] = "", url.rstrip("/") + "/health"
    for name, answer in _ask_all(questions).items():
        lines[name] = ", ".join(filter(None, (lines[name], _health(name, answer))))
    for name, line in lines.items():
        print(f"{name}: {line}", file=out)
    return code


def _ask_all(urls: dict[str, str], timeout: float = STATUS_TIMEOUT) -> dict[str, Answer]:
    """Every URL at once: an engine that does not answer costs its timeout once."""
    if not urls:
        return {}
    with ThreadPoolExecutor(len(urls)) as pool:
        asked = {name: pool.submit(ask, url, None, timeout) for name, url in urls.items()}
        return {name: future.result() for name, future in asked.items()}


def _health(name: str, answer: Answer) -> str:
    if name == "gateway":
        return "ready" if answer.ok else f"not ready: {answer.why_not.removeprefix('Not ready: ')}"
    if not answer.ok:
        return f"not answering: {answer.why_not}"
    slots = answer.body.get("slots") if isinstance(answer.body, dict) else None
    if isinstance(slots, int) and name.startswith("backend"):
        return f"answering, {slots} slot{'s' if slots != 1 else ''}"
    return "answering"


def _describe(record: ProcessRecord) -> str:
    info = record.info
    what = f"to {info.get('backend')}"
    if "model" in info:
        what = f"model {info['model']} ({info.get('engine', 'llama-cpp-python')})"
    return (
        f"running, pid {record.pid}, {info.get('host')}:{info.get('port')}, "
        f"{what}, up {_duration(record.uptime)}"
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def logs(
    layout: Layout, lines: int, follow: bool, service: str = "engine", out: TextIO = sys.stdout
) -> int:
    chosen = Service(service, layout.run, layout.logs)
    logfile: Path = chosen.logfile
    if not logfile.exists():
        print(f"llamaserve: no log yet ({logfile})", file=out)
        return 1
    if follow:
        os.execvp("tail", ["tail", "-n", str(lines), "-F", str(logfile)])
    print(chosen.tail(lines), file=out)
    return 0
