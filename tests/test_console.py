"""console.sh: refusals before launch, start/stop/status/logs, stale pidfiles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llamaserve.config import Layout, Settings
from llamaserve.ops import console
from llamaserve.ops.console import unused_engine_warning
from llamaserve.ops.process import Service, start_ticks
from tests.conftest import ENGINES, ROOT, Engine, Project, free_port, make_project, run


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_no_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    project = make_project(tmp_path / "rt", LLAMA_MODELS_DIR=str(tmp_path / "empty"))
    one_line_error(project.console("start"), "no model", "install.sh")


def test_several_models_without_llama_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (models / name).write_bytes(b"GGUF" + b"\0" * 16)
    project = make_project(tmp_path / "rt", LLAMA_MODELS_DIR=str(models))
    one_line_error(project.console("start"), "several models", "a.gguf", "b.gguf", "LLAMA_MODEL")


def test_llama_model_names_a_missing_file(tmp_path: Path) -> None:
    project = make_project(tmp_path / "rt", LLAMA_MODEL="missing.gguf")
    one_line_error(project.console("start"), "LLAMA_MODEL=missing.gguf", "no such file")


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("<html>not a model</html>")
    project = make_project(tmp_path / "rt", LLAMA_MODEL=str(fake))
    one_line_error(project.console("start"), "not a GGUF file")


@pytest.mark.parametrize(
    ("key", "reason"),
    [("", "empty"), ("CHANGE_ME_PLEASE_0123456789", "placeholder"), ("short", "shorter")],
)
def test_unusable_api_key(tmp_path: Path, key: str, reason: str) -> None:
    project = make_project(tmp_path / "rt", LLAMA_SERVER_API_KEY=key)
    one_line_error(project.console("start"), "LLAMA_SERVER_API_KEY", reason)


def stand_in_model(tmp_path: Path) -> str:
    """A file with GGUF's magic, for a start refused after the model is found: none is
    loaded, so the tests of such refusals need no real model."""
    path = tmp_path / "stand-in.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


def stand_ins(tmp_path: Path) -> dict[str, str]:
    """A stand-in model and llama-server, for a start refused after both are found:
    neither is run."""
    binary = tmp_path / "stand-in-llama-server"
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    return {"LLAMA_MODEL": stand_in_model(tmp_path), "LLAMA_SERVER_BIN": str(binary)}


@contextmanager
def port_held_by_another_program() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_port_already_taken(tmp_path: Path) -> None:
    with port_held_by_another_program() as port:
        project = make_project(tmp_path / "rt", **stand_ins(tmp_path), LLAMA_SERVER_PORT=str(port))
        one_line_error(project.console("start"), f"port {port}", "already in use")
    assert not (project.runtime / "run" / "engine.pid").exists()


def test_the_gateway_refuses_an_engine_users_could_reach_around_it(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "rt",
        **stand_ins(tmp_path),
        LLAMA_PROXY_ENABLED="1",
        LLAMA_SERVER_HOST="0.0.0.0",
    )
    one_line_error(project.console("start"), "bypass the gateway", 'LLAMA_SERVER_HOST="127.0.0.1"')
    assert not (project.runtime / "run" / "engine.pid").exists()


@contextmanager
def running_engine(project: Project, host: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process recorded in the pidfile as the engine, running on `host`."""
    engine = subprocess.Popen(["sleep", "60"])
    try:
        info = {"host": host, "port": 8000}
        record = {"pid": engine.pid, "start_ticks": start_ticks(engine.pid),
                  "started_at": time.time(), "info": info}  # fmt: skip
        run_dir = project.runtime / "run"
        run_dir.mkdir(parents=True)
        (run_dir / "engine.pid").write_text(json.dumps(record))
        yield engine
    finally:
        engine.kill()
        engine.wait()


def test_the_gateway_refuses_a_running_engine_users_could_reach_around_it(
    tmp_path: Path,
) -> None:
    # An engine started on 0.0.0.0 before the gateway was enabled and the host changed.
    project = make_project(
        tmp_path / "rt",
        **stand_ins(tmp_path),
        LLAMA_PROXY_ENABLED="1",
        LLAMA_SERVER_HOST="127.0.0.1",
    )
    with running_engine(project, "0.0.0.0") as engine:
        line = one_line_error(project.console("start"), "running on 0.0.0.0", "bypass the gateway")
        assert "./console.sh restart" in line
        assert not (project.runtime / "run" / "gateway.pid").exists()
        assert engine.poll() is None  # left as it is


def test_restart_with_a_config_start_would_refuse_stops_nothing(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "rt",
        **stand_ins(tmp_path),
        LLAMA_PROXY_ENABLED="1",
        LLAMA_SERVER_HOST="0.0.0.0",
    )
    with running_engine(project, "127.0.0.1") as engine:
        one_line_error(project.console("restart"), "bypass the gateway", "nothing was stopped")
        assert engine.poll() is None


def test_restart_onto_a_port_another_program_holds_stops_nothing(tmp_path: Path) -> None:
    with port_held_by_another_program() as port:
        project = make_project(tmp_path / "rt", **stand_ins(tmp_path), LLAMA_SERVER_PORT=str(port))
        with running_engine(project, "127.0.0.1") as engine:  # on port 8000
            said = project.console("restart")
            one_line_error(
                said, f"port {port} on 127.0.0.1 is already in use", "nothing was stopped"
            )
            assert engine.poll() is None  # before, it was stopped, and start then failed


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [("LLAMA_SERVER_PORT", "80a0", "valid integer"), ("LLAMA_SERVER_PORT", "99999", "65535"),
     ("LLAMA_ENGINE", "llama.cpp", "'llama-cpp-python' or 'llama-server'"),
     ("LLAMA_PROXY_ENABLED", "enabled", "valid boolean"),
     ("LLAMA_PROXY_QUEUE_TIMEOUT", "5m", "valid number")],
)  # fmt: skip
def test_an_invalid_setting_is_one_line_and_stop_still_stops(
    tmp_path: Path, name: str, value: str, says: str
) -> None:
    project = make_project(tmp_path / "rt", **{name: value})
    config = project.runtime / "config.env"
    line = one_line_error(project.console("start"), f"invalid {name}={value!r} in", says)
    assert str(config) in line
    assert project.console("status").stderr.strip() == line
    with running_engine(project, "127.0.0.1") as engine:
        one_line_error(project.console("restart"), f"invalid {name}", "(nothing was stopped)")
        assert engine.poll() is None
        stopped = project.console("stop")
        assert stopped.returncode == 0 and "engine stopped" in stopped.stdout
        assert "stopping with the default settings" in stopped.stderr
        assert engine.wait(timeout=10) is not None
    env = {**project.env, name: value}  # the environment's value is named as such
    from_env = run([str(ROOT / "console.sh"), "start"], env)
    one_line_error(from_env, f"invalid {name}={value!r} in the environment")


def test_a_config_line_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    project = make_project(tmp_path / "rt")
    config = project.runtime / "config.env"
    lines = config.read_text().splitlines()
    config.write_text("\n".join([*lines, 'LLAMA_N_CTX="2048']) + "\n")
    try:
        one_line_error(
            project.console("start"), f"line {len(lines) + 1}: cannot read 'LLAMA_N_CTX=\"2048'"
        )
    finally:  # skipping the line, as before, started the engine
        config.write_text("\n".join(lines) + "\n")
        project.console("stop")


def test_a_misspelt_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    project = make_project(
        tmp_path / "rt", LLAMA_MODELS_DIR=str(tmp_path / "empty"), LLAMA_PROXY_RATELIMIT="5"
    )
    started = project.console("start")
    assert (
        "LLAMA_PROXY_RATELIMIT is not a setting and is ignored "
        "(did you mean LLAMA_PROXY_RATE_LIMIT?)" in started.stderr
    )
    assert "no model" in started.stderr  # and start goes on to what it checks


@pytest.mark.parametrize(
    ("backends", "named"),
    [("", "is empty"), ("127.0.0.1:8000", "'127.0.0.1:8000'"), ("http://", "'http://'"),
     ("http://127.0.0.1:8000,ftp://10.0.0.5", "'ftp://10.0.0.5'")],
)  # fmt: skip
def test_a_backend_url_that_is_not_an_engine_url_is_one_line(
    tmp_path: Path, backends: str, named: str
) -> None:
    project = make_project(
        tmp_path / "rt",
        **stand_ins(tmp_path),
        LLAMA_PROXY_ENABLED="1",
        LLAMA_SERVER_BACKEND_URL=backends,
    )
    one_line_error(project.console("start"), "LLAMA_SERVER_BACKEND_URL", named)
    assert not (project.runtime / "run" / "engine.pid").exists()


@pytest.mark.parametrize(
    ("host", "backends", "warned"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000", False),
        ("127.0.0.1", "http://localhost:8000/", False),
        ("127.0.0.1", "http://10.0.0.5:8000,http://127.0.0.1:8000", False),
        ("127.0.0.1", "http://127.0.0.1:18000", True),  # the engine's port changed alone
        ("127.0.0.1", "http://10.0.0.5:8000", True),
        ("10.0.0.7", "http://10.0.0.7:8000", False),
    ],
)
def test_a_backend_list_without_the_engine_started_here_is_named(
    host: str, backends: str, warned: bool
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        llama_server_host=host,
        llama_server_port=8000,
        llama_server_backend_url=backends,
    )
    layout = Layout(ROOT, ROOT / "runtime2", ROOT / "models")  # LLAMA_RUNTIME_DIR=runtime2
    warning = unused_engine_warning(settings, layout)
    assert (warning is not None) == warned
    if warning:
        assert "http://" + ("127.0.0.1" if host == "127.0.0.1" else host) + ":8000" in warning
        assert "in runtime2/config.env unless" in warning  # the file the settings came from


def test_llama_server_missing_is_one_line(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "rt",
        LLAMA_MODEL=stand_in_model(tmp_path),
        LLAMA_ENGINE="llama-server",
        LLAMA_SERVER_BIN=str(tmp_path / "none"),
    )
    one_line_error(
        project.console("start"),
        "no llama-server",
        "./runtime/install.sh --engine llama-server",
        "LLAMA_SERVER_BIN",
    )


@pytest.mark.slow  # it starts an engine of its own
@pytest.mark.parametrize("engine_name", ENGINES)
def test_engine_dying_while_starting_shows_its_log(tmp_path: Path, engine_name: str) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))  # right magic, unloadable
    project = make_project(tmp_path / "rt", LLAMA_MODEL=str(broken), LLAMA_ENGINE=engine_name)
    result = project.console("start", timeout=120)
    assert result.returncode != 0
    assert "exited" in result.stdout and "engine.log" in result.stdout
    assert len(result.stdout.splitlines()) > 3  # the end of the log is shown
    assert project.console("status").returncode == 3


def test_status_and_start_again_while_running(engine: Engine) -> None:
    status = engine.project.console("status")
    assert status.returncode == 0
    line = status.stdout.strip()
    assert "running" in line and engine.model in line
    assert engine.base_url.rsplit(":", 1)[1] in line and "pid" in line and "up " in line
    again = engine.project.console("start")
    assert again.returncode == 0 and "already running" in again.stdout
    assert "warning" not in again.stdout  # started as the config says
    record = json.loads((engine.project.runtime / "run" / "engine.pid").read_text())
    port = record["info"]["port"]
    moved = run([str(ROOT / "console.sh"), "start"],
                {**engine.project.env, "LLAMA_SERVER_PORT": str(port + 1)})  # fmt: skip
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"runs with port {port}" in moved.stdout
    assert "./console.sh restart applies them" in moved.stdout
    # Any setting the engine runs with, not only its address; a key by name only.
    key = "k" * 40
    env = {**engine.project.env, "LLAMA_N_CTX": "1024", "LLAMA_SERVER_API_KEY": key}
    changed = run([str(ROOT / "console.sh"), "start"], env)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "runs with other values of LLAMA_SERVER_API_KEY, LLAMA_N_CTX" in changed.stdout
    pidfile = engine.project.runtime / "run" / "engine.pid"
    assert key not in changed.stdout + pidfile.read_text()
    # The record is the owner's alone, and its key's fingerprint is salted: no table of
    # common keys' or passwords' hashes finds the running key in it.
    assert pidfile.stat().st_mode & 0o777 == 0o600
    plain = hashlib.sha256(engine.api_key.encode()).hexdigest()[:12]
    assert plain not in pidfile.read_text()
    gateway_only = run([str(ROOT / "console.sh"), "start"],
                       {**engine.project.env, "LLAMA_PROXY_QUEUE_TIMEOUT": "5"})  # fmt: skip
    assert "warning" not in gateway_only.stdout  # not the engine's


def test_the_engine_log_leaves_out_health_probes_that_succeed(engine: Engine) -> None:
    # A gateway probes every engine every 2 s: 43,200 lines a day in the engine's log.
    import httpx

    for _ in range(3):
        assert httpx.get(f"{engine.base_url}/health").status_code == 200
    headers = {"Authorization": f"Bearer {engine.api_key}"}
    assert httpx.get(f"{engine.base_url}/v1/models", headers=headers).status_code == 200
    log = (engine.project.runtime / "logs" / "engine.log").read_text()
    assert '"GET /v1/models HTTP/1.1" 200' in log  # the other requests still are
    assert '"GET /health HTTP/1.1" 200' not in log


def test_the_engine_log_names_the_connection_not_a_forwarded_address(engine: Engine) -> None:
    # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: a local client could
    # write any address into the engine's log.
    import httpx

    headers = {"Authorization": f"Bearer {engine.api_key}", "X-Forwarded-For": "203.0.113.9"}
    assert httpx.get(f"{engine.base_url}/v1/models", headers=headers).status_code == 200
    log = (engine.project.runtime / "logs" / "engine.log").read_text()
    assert "203.0.113.9" not in log
    assert "127.0.0.1:" in log.splitlines()[-1]  # the line of that request


def test_logs_shows_the_last_lines(engine: Engine) -> None:
    result = engine.project.console("logs", "-n", "3", "--no-follow")
    assert result.returncode == 0
    assert 1 <= len(result.stdout.splitlines()) <= 3


def test_help_and_a_wrong_command(project: Project) -> None:
    for asked in ("--help", "-h", "help"):
        helped = project.console(asked)
        assert helped.returncode == 0 and "--service engine|gateway" in helped.stdout
        assert all(f"  {command} " in helped.stdout for command in ("start", "stop", "logs"))
    wrong = project.console("begin")
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage: ./console.sh start|")


def test_status_into_a_closed_pipe_is_quiet(project: Project) -> None:
    # `true` exits before status writes: its output meets a closed pipe.
    script = '"$0" status | true; echo "status exit ${PIPESTATUS[0]}" >&2'
    result = run(["bash", "-c", script, str(ROOT / "console.sh")], project.env)
    assert result.stderr.strip() == "status exit 3", result.stderr  # no traceback


def test_stop_when_stopped_and_status_exit_code(project: Project) -> None:
    assert project.console("stop").returncode == 0
    status = project.console("status")
    assert status.returncode == 3 and "stopped" in status.stdout


def test_stale_pidfile_with_a_reused_pid_is_never_signalled(project: Project) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        run_dir = project.runtime / "run"
        run_dir.mkdir(parents=True)
        # The pid is alive, but it is not the process the pidfile recorded.
        record = {"pid": stranger.pid, "start_ticks": 1, "started_at": time.time(), "info": {}}
        (run_dir / "engine.pid").write_text(json.dumps(record))
        status = project.console("status")
        assert status.returncode == 3 and "stale" in status.stdout
        assert project.console("stop").returncode == 0
        assert stranger.poll() is None  # still alive: never signalled
        assert not (run_dir / "engine.pid").exists()
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait()


def test_a_process_that_ignores_sigterm_is_killed_with_its_children_and_stop_says_so(
    tmp_path: Path,
) -> None:
    # Like llama-server under the engine's launcher: the child must not outlive the kill.
    project = make_project(tmp_path / "rt", LLAMA_STOP_TIMEOUT="0.5")
    service = Service("engine", project.runtime / "run", project.runtime / "logs")
    pidfile = tmp_path / "child.pid"
    script = (
        "import pathlib, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "pathlib.Path(sys.argv[1]).write_text(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    proc = service.spawn([sys.executable, "-c", script, str(pidfile)], env={}, info={})
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.05)
    child = int(pidfile.read_text())
    stopped = project.console("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert stopped.stdout.startswith(
        "llamaserve: warning: engine killed: still running 0.5s after SIGTERM (LLAMA_STOP_TIMEOUT)"
    ), stopped.stdout
    assert "engine stopped" not in stopped.stdout
    deadline = time.monotonic() + 5
    while start_ticks(child) is not None:
        assert time.monotonic() < deadline, "the child outlived its parent's SIGKILL"
        time.sleep(0.05)


@pytest.mark.slow  # it starts an engine of its own
@pytest.mark.parametrize("engine_name", ENGINES)
def test_start_stop_restart_cycle(tmp_path: Path, engine_name: str) -> None:
    project = make_project(tmp_path / "rt", LLAMA_ENGINE=engine_name)
    try:
        started = project.console("start")
        assert started.returncode == 0, started.stdout + started.stderr
        # What start prints to try works as printed (the config sourced, as it says).
        source, curl = (line.strip() for line in started.stdout.splitlines()[-2:])
        assert source.startswith("source ") and curl.startswith("curl ")
        tried = run(["bash", "-c", f"{source} && {curl}"], project.env, timeout=120)
        answer = json.loads(tried.stdout)
        assert answer["choices"][0]["message"]["content"], tried.stdout + tried.stderr
        assert answer["usage"]["completion_tokens"] <= 64
        first = json.loads((project.runtime / "run" / "engine.pid").read_text())["pid"]
        restarted = project.console("restart")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        second = json.loads((project.runtime / "run" / "engine.pid").read_text())["pid"]
        assert second != first
        stopped = project.console("stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert not (project.runtime / "run" / "engine.pid").exists()
        assert start_ticks(second) is None  # gone (or a zombie awaiting its reaper)
    finally:
        project.console("stop")


def test_console_refuses_before_install(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(Path(__file__).parents[1] / "console.sh", clone)
    result = subprocess.run([str(clone / "console.sh"), "start"], capture_output=True, text=True)
    assert result.returncode == 1 and "install.sh" in result.stderr


SLOW = """
import http.server, json, sys
class Busy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"error": {"message": "Not ready: engine: not reachable"}}).encode()
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Busy).serve_forever()
"""


def test_start_says_what_a_service_slow_to_be_ready_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "NOTICE", 1.0)
    port = free_port()
    plan = console.Plan(
        service=Service("gateway", tmp_path / "run", tmp_path / "logs"),
        argv=[sys.executable, "-c", SLOW, str(port)],
        env=dict(os.environ),
        ready_url=f"http://127.0.0.1:{port}/ready",
        key=None,
        host="127.0.0.1",
        port=port,
        info={},
    )
    out = io.StringIO()
    assert not console.launch(plan, timeout=3, stop_timeout=5, out=out)
    said = out.getvalue()
    assert "gateway not ready yet (Not ready: engine: not reachable); waiting up to 3s" in said
    assert "did not become ready within 3s" in said
    assert plan.service.running() is None  # stopped


def test_setting_files_with_a_secret_are_made_private_once(tmp_path: Path) -> None:
    """`.env` as `cp .env.example .env` leaves it (644), with a password, and a config.env
    readable by others: console.sh makes both 600 and says so, once."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "console.sh", clone)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env_file = clone / ".env"
    env_file.write_text('POSTGRES_AUTH_PASSWORD="pw"\n')
    env_file.chmod(0o644)
    project = make_project(tmp_path / "rt")
    config = project.runtime / "config.env"
    config.chmod(0o640)

    def status() -> list[str]:
        result = run([str(clone / "console.sh"), "status"], project.env)
        assert result.returncode == console.EXIT_STOPPED, result.stdout + result.stderr
        return result.stderr.splitlines()

    assert status() == [
        f"llamaserve: warning: {env_file} holds POSTGRES_AUTH_PASSWORD and was readable by "
        "others (mode 644): made it 600",
        f"llamaserve: warning: {config} holds LLAMA_SERVER_API_KEY and was readable by "
        "others (mode 640): made it 600",
    ]
    for path in (env_file, config):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert status() == []  # said once


def test_service_logs_are_the_operators_alone(tmp_path: Path) -> None:
    """New logs are 600 in a 700 directory; those earlier versions left (644 in 755) are
    tightened."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    logs.chmod(0o755)
    (logs / "engine.log").write_text("earlier\n")
    (logs / "engine.log").chmod(0o644)
    for name, where in (("engine", logs), ("gateway", tmp_path / "new" / "logs")):
        plan = console.Plan(
            service=Service(name, tmp_path / "run", where),
            argv=[sys.executable, "-c", "print('started')"],
            env=dict(os.environ),
            ready_url=f"http://127.0.0.1:{free_port()}/ready",
            key=None,
            host="127.0.0.1",
            port=0,
            info={},
        )
        assert not console.launch(plan, timeout=10, stop_timeout=5, out=io.StringIO())
        assert "started" in plan.service.logfile.read_text()
        assert stat.S_IMODE(plan.service.logfile.stat().st_mode) == 0o600
    assert (logs / "engine.log").read_text().startswith("earlier\n")
    assert stat.S_IMODE(logs.stat().st_mode) == 0o750  # the group is the operator's
    assert stat.S_IMODE((tmp_path / "new" / "logs").stat().st_mode) == 0o700
