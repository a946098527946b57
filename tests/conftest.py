"""Shared fixtures: an isolated runtime directory per test, and the real engine started
the way a user starts it (`console.sh start`), on a free port.

Two tiers: a test is `slow` when it needs the real model, which it does when it uses
a fixture of MODEL_FIXTURES (marked here, by what it uses) or starts an engine itself
(marked in its file). `pytest -m "not slow"` needs no model and no engine binary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from llamaserve.config import new_engine_key

pytest_plugins = ["tests.pgfixtures"]

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def raw_post(base_url: str, key: str, path: str, payload: dict[str, object]) -> Iterator[None]:
    """A plain (unstreamed) POST over a bare socket, whose client goes away when the block
    ends, without reading anything: no HTTP library decides when the connection closes."""
    body = json.dumps(payload).encode()
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        yield


def default_model() -> Path:
    models = sorted(MODELS.glob("*.gguf"))
    assert len(models) == 1, "run ./runtime/install.sh first: models/ must hold the default model"
    return models[0]


def write_config(runtime: Path, **values: str) -> None:
    """A config.env in `runtime`, from the template, with the given values set."""
    runtime.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "runtime" / "config.env.template").read_text().splitlines()
    for key, value in values.items():
        lines = [line for line in lines if not line.startswith(f"{key}=")]
        lines.append(f'{key}="{value}"')
    (runtime / "config.env").write_text("\n".join(lines) + "\n")
    (runtime / "config.env").chmod(0o600)  # as install.sh writes it: it holds the engine's key


def run(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Project:
    """An isolated runtime directory (config, logs, pidfiles) over this checkout."""

    runtime: Path
    env: dict[str, str]

    def console(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run([str(ROOT / "console.sh"), *args], self.env, timeout)


def make_project(runtime: Path, **config: str) -> Project:
    config.setdefault("LLAMA_SERVER_API_KEY", new_engine_key())
    config.setdefault("LLAMA_SERVER_HOST", "127.0.0.1")
    config.setdefault("LLAMA_SERVER_PORT", str(free_port()))
    write_config(runtime, **config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "POSTGRES_"))}
    env["LLAMA_RUNTIME_DIR"] = str(runtime)
    return Project(runtime, env)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return make_project(tmp_path / "runtime")


ENVELOPE = {"message", "type", "param", "code"}  # OpenAI's error object
ENGINES = ("llama-cpp-python", "llama-server")
# The fixtures that start the real model: (module, name), whatever a test file calls its own.
MODEL_FIXTURES = {("tests.conftest", "engine"), ("tests.gateway.conftest", "stack")}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if needs_the_model(item):
            item.add_marker(pytest.mark.slow)


def needs_the_model(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name in item.fixturenames:  # type: ignore[attr-defined]
        used = info.name2fixturedefs.get(name)  # the last is the one this test gets
        if used and (used[-1].func.__module__, name) in MODEL_FIXTURES:
            return True
    return False


@dataclass
class Engine:
    base_url: str
    api_key: str
    model: str
    project: Project
    name: str
    clients: list[OpenAI] = field(default_factory=list)

    def client(self, api_key: str | None = None) -> OpenAI:
        """A client of the engine, closed with it (see `close_clients`)."""
        client = OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key or self.api_key,
            max_retries=0,
            timeout=300,
        )
        self.clients.append(client)
        return client


def close_clients(clients: list[OpenAI]) -> None:
    """Close the clients a test left open: else the garbage collector finds their sockets
    open whenever it runs (a client that raised sits in a reference cycle), and the
    ResourceWarning fails whatever is running then."""
    while clients:
        clients.pop().close()


@pytest.fixture(scope="session", params=ENGINES)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """The real default model behind `console.sh start`, once per engine for the session.

    pytest groups the tests by engine, so only one runs at a time.
    """
    name: str = request.param
    port = free_port()
    key = new_engine_key()
    project = make_project(
        tmp_path_factory.mktemp(name) / "runtime",
        LLAMA_SERVER_API_KEY=key,
        LLAMA_SERVER_PORT=str(port),
        LLAMA_ENGINE=name,
    )
    started = project.console("start")
    assert started.returncode == 0, started.stdout + started.stderr
    engine = Engine(f"http://127.0.0.1:{port}", key, default_model().name, project, name)
    try:
        yield engine
    finally:
        close_clients(engine.clients)
        project.console("stop")


@pytest.fixture
def client(engine: Engine) -> Iterator[OpenAI]:
    with engine.client() as client:
        yield client


def exchange(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes (no HTTP library re-encodes them); everything the server answers
    until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def refusal(url: str, head: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send a request's head that never ends: the status line the server answers, and
    its error (in OpenAI's envelope), read until it closes the connection."""
    answer = exchange(url, head)
    status_line, _, rest = answer.partition(b"\r\n")
    error: dict[str, Any] = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert set(error) == ENVELOPE
    return status_line, error
