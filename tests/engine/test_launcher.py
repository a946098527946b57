"""The llama-server launcher: its child process, its key, cancellation, and `/health`."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from llamaserve.config import Settings, new_engine_key
from llamaserve.engine.llama_server import build_argv
from llamaserve.engine.sizing import auto_slots
from llamaserve.ops.process import start_ticks
from tests.conftest import (
    ENGINES,
    ROOT,
    Engine,
    Project,
    default_model,
    free_port,
    make_project,
    raw_post,
    refusal,
)

LLAMA_SERVER = pytest.mark.parametrize("engine", ["llama-server"], indirect=True)
# A continuation the model never ends by itself: slots stay busy until cancelled.
ENDLESS = {"prompt": "the the the the", "max_tokens": 3000, "temperature": 0}


def launcher_pid(project: Project) -> int:
    return int(json.loads((project.runtime / "run" / "engine.pid").read_text())["pid"])


def llama_server_pid(project: Project) -> int:
    pid = launcher_pid(project)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def private_url(project: Project) -> str:
    argv = cmdline(llama_server_pid(project))
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"


def busy_slots(engine: Engine) -> int:
    return generating(engine.project, engine.api_key)


def generating(project: Project, api_key: str) -> int:
    """How many of llama-server's slots are generating, from its own /slots."""
    slots = httpx.get(
        f"{private_url(project)}/slots", headers={"Authorization": f"Bearer {api_key}"}
    ).json()
    return sum(1 for slot in slots if slot["is_processing"])


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until condition() held; fails after timeout."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"not within {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - began


def test_health_answers_the_number_of_slots(engine: Engine) -> None:
    response = httpx.get(f"{engine.base_url}/health")  # no key
    assert response.status_code == 200
    slots = auto_slots(os.cpu_count() or 1) if engine.name == "llama-server" else 1
    assert response.json() == {"status": "ok", "slots": slots}


@LLAMA_SERVER
def test_the_key_is_never_on_the_command_line(engine: Engine) -> None:
    argv = cmdline(llama_server_pid(engine.project))
    assert not any(engine.api_key in arg for arg in argv)
    key_file = Path(argv[argv.index("--api-key-file") + 1])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "--alias" in argv and engine.model in argv


@LLAMA_SERVER
def test_engine_routes_are_not_served(engine: Engine) -> None:
    headers = {"Authorization": f"Bearer {engine.api_key}"}
    for path in ("/slots", "/props", "/metrics"):
        response = httpx.get(f"{engine.base_url}{path}", headers=headers)
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@LLAMA_SERVER
def test_a_stream_whose_client_goes_away_frees_its_slot(engine: Engine) -> None:
    stream = engine.client().completions.create(  # type: ignore[call-overload]
        model=engine.model, stream=True, extra_body={"ignore_eos": True}, **ENDLESS
    )
    next(iter(stream))
    assert busy_slots(engine) == 1
    stream.close()
    assert wait_until(lambda: busy_slots(engine) == 0, timeout=1.0) < 1.0


@LLAMA_SERVER
def test_a_plain_request_whose_client_goes_away_frees_its_slot(engine: Engine) -> None:
    payload = {"model": engine.model, **ENDLESS, "ignore_eos": True}
    with raw_post(engine.base_url, engine.api_key, "/v1/completions", payload):
        wait_until(lambda: busy_slots(engine) == 1, timeout=30.0)
        time.sleep(0.3)  # generating, with nothing sent to the client yet
    assert wait_until(lambda: busy_slots(engine) == 0, timeout=1.0) < 1.0


def gone(pid: int, ticks: int | None) -> bool:
    return start_ticks(pid) != ticks  # None for a zombie: it has ended


def started_llama_server(tmp_path: Path) -> tuple[Project, int, int]:
    project = make_project(tmp_path / "rt", LLAMA_ENGINE="llama-server")
    started = project.console("start")
    assert started.returncode == 0, started.stdout + started.stderr
    return project, launcher_pid(project), llama_server_pid(project)


@pytest.mark.slow  # it starts an engine of its own
def test_llama_server_stops_with_the_launcher(tmp_path: Path) -> None:
    project, launcher, child = started_llama_server(tmp_path)
    launcher_ticks, child_ticks = start_ticks(launcher), start_ticks(child)
    try:
        assert project.console("stop").returncode == 0
        assert gone(launcher, launcher_ticks) and gone(child, child_ticks)
        assert not list((project.runtime / "run").glob("*.key"))
    finally:
        project.console("stop")


@pytest.mark.slow  # it starts an engine of its own
def test_llama_server_dies_with_a_killed_launcher(tmp_path: Path) -> None:
    project, launcher, child = started_llama_server(tmp_path)
    ticks = start_ticks(child)
    try:
        os.kill(launcher, signal.SIGKILL)
        wait_until(lambda: gone(child, ticks), timeout=5.0)
    finally:
        project.console("stop")


@pytest.mark.slow  # it starts an engine of its own
def test_the_launcher_exits_non_zero_when_llama_server_dies(tmp_path: Path) -> None:
    project = make_project(tmp_path / "rt", LLAMA_ENGINE="llama-server")
    port = read_port(project)
    env = {**project.env, "LLAMASERVE_ROOT": str(ROOT)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "llamaserve", "serve-engine"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), timeout=60.0)
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        key = read_setting(project, "LLAMA_SERVER_API_KEY")
        base, headers = f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {key}"}
        model = httpx.get(f"{base}/models", headers=headers).json()["data"][0]["id"]
        chat = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 2000, "stream": True}  # fmt: skip
        url = f"{base}/chat/completions"
        with httpx.stream("POST", url, json=chat, headers=headers, timeout=60) as answer:
            lines = answer.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it generates
            os.kill(int(children[0]), signal.SIGKILL)  # llama-server dies mid-answer
            rest = [line for line in lines if line.startswith("data: ")]
        # The stream ends with an error in words, then [DONE]: not cut, not a class name.
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["message"] == "llama-server closed the connection mid-answer."
        assert launcher.wait(timeout=10) == 1
    finally:
        launcher.kill()
        launcher.wait()


def read_port(project: Project) -> str:
    return read_setting(project, "LLAMA_SERVER_PORT")


def read_setting(project: Project, name: str) -> str:
    config = (project.runtime / "config.env").read_text()
    return next(
        line.split("=", 1)[1].strip('"')
        for line in config.splitlines()
        if line.startswith(f"{name}=")
    )


def answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


@LLAMA_SERVER
def test_back_to_back_streams_all_succeed(engine: Engine) -> None:
    client = engine.client()
    for _ in range(12):
        chunks = list(
            client.completions.create(
                model=engine.model, prompt="Once upon", max_tokens=2, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"


def test_llama_server_gets_the_thread_settings(tmp_path: Path) -> None:
    """Generation threads leave a core to the rest; batches (prompts, and the tokens of
    several busy slots) get all cores unless set otherwise; idle threads never spin."""

    def threads(**values: object) -> tuple[str, str]:
        settings = Settings(llama_engine="llama-server", **values)
        argv = build_argv(
            settings, tmp_path / "m.gguf", binary=tmp_path / "bin", port=1, key_file=tmp_path
        )
        assert argv[argv.index("--poll") + 1] == "0"
        return argv[argv.index("--threads") + 1], argv[argv.index("--threads-batch") + 1]

    assert threads(llama_n_threads=3) == ("3", str(os.cpu_count()))
    assert threads(llama_n_threads=1, llama_n_threads_batch=5) == ("1", "5")
    assert threads() == (str(max(1, (os.cpu_count() or 1) - 1)), str(os.cpu_count()))


@pytest.mark.slow  # it starts an engine of its own
@pytest.mark.parametrize("engine_name", ENGINES)
def test_request_heads_are_bounded_in_size_and_time(tmp_path: Path, engine_name: str) -> None:
    """The engine listens on a public address when it serves alone: a head that never
    ends must not hold its connection (as in the gateway, see heads.py)."""
    with started_engine(tmp_path, engine_name, LLAMA_HEADER_TIMEOUT="1") as (url, client, _):
        head = b"GET /v1/models HTTP/1.1\r\nHost: engine\r\n"
        status_line, error = refusal(url, head + b"X-Big: " + b"a" * (66 * 1024))
        assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert error["code"] == "request_header_fields_too_large"
        status_line, error = refusal(url, head)
        assert status_line == b"HTTP/1.1 408 Request Timeout" and error["code"] == "request_timeout"
        assert client.models.list().data[0].id == default_model().name  # served as before


@pytest.mark.slow  # it starts an engine of its own
@pytest.mark.parametrize("engine_name", ENGINES)
def test_requests_still_going_at_the_end_of_the_stop_grace_end_with_an_error(
    tmp_path: Path, engine_name: str
) -> None:
    # With LLAMA_STOP_TIMEOUT=10 the requests get 5 s, the engine 5 more to exit.
    with started_engine(tmp_path, engine_name, LLAMA_STOP_TIMEOUT="10") as (_, client, project):
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(1) as pool:
            stream = client.completions.create(model=model, stream=True, **ENDLESS)
            chunks = iter(stream)
            next(chunks)  # generating
            whole = pool.submit(client.completions.create, model=model, **ENDLESS)
            stopped = time.monotonic()
            stop = subprocess.Popen(
                [str(ROOT / "console.sh"), "stop"], env=project.env, stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            with pytest.raises(openai.APIError, match="stopping"):  # not cut by a kill
                for _ in chunks:
                    pass
            with pytest.raises(openai.APIStatusError) as refused:
                whole.result()
            ended = time.monotonic() - stopped
            said, _ = stop.communicate(timeout=30)
        assert stop.returncode == 0
        assert ended > 5, "ended at the grace, not at once"
        assert said.strip() == "llamaserve: engine stopped", "exited by itself, not killed"
        assert refused.value.status_code == 503 and refused.value.code == "server_stopping"
        log = (project.runtime / "logs" / "engine.log").read_text()
        assert "timeout graceful shutdown exceeded" not in log


@contextmanager
def started_engine(
    tmp_path: Path, engine_name: str, **config: str
) -> Iterator[tuple[str, OpenAI, Project]]:
    """An engine of its own, started with `console.sh start` and `config`: its URL, a
    client and its project; stopped at the end."""
    key, port = new_engine_key(), free_port()
    project = make_project(tmp_path / "rt", LLAMA_ENGINE=engine_name, LLAMA_SERVER_API_KEY=key,
                           LLAMA_SERVER_PORT=str(port), **config)  # fmt: skip
    try:
        started = project.console("start")
        assert started.returncode == 0, started.stdout + started.stderr
        url = f"http://127.0.0.1:{port}"
        yield url, OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0), project
    finally:
        project.console("stop")
