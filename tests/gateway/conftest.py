"""The whole multi-user stack, set up as the README tells a user to: bootstrap, init-db,
create-user, console.sh start (engine on loopback, private PostgreSQL, gateway); and a
site (tests/gateway/harness.py), the gateway's world without a model, for the fast tier."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from bench.mock_engine import MockEngine
from openai import OpenAI

from llamaserve.config import Settings
from llamaserve.gateway import db_status
from tests.conftest import ENGINES, ROOT, Project, close_clients, free_port, make_project, run
from tests.gateway.harness import Site, new_site
from tests.pgfixtures import PgDatabase


@dataclass
class Stack:
    project: Project
    gateway_url: str
    engine_url: str
    engine_key: str
    model: str
    engine: str
    clients: list[OpenAI] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment of a CLI or gateway process on this stack."""
        return self.project.env

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([str(ROOT / "bin" / "user_management_cli.sh"), *args], self.project.env)

    def create_user(self, username: str, *options: str) -> str:
        """A new user; returns their key (shown once)."""
        result = self.cli("create-user", "--username", username, "--json", *options)
        assert result.returncode == 0, result.stdout + result.stderr
        return str(json.loads(result.stdout)["key"])

    def client(self, key: str) -> OpenAI:
        """A client of the gateway with a user's key, closed with the stack."""
        client = OpenAI(base_url=f"{self.gateway_url}/v1", api_key=key, max_retries=0, timeout=300)
        self.clients.append(client)
        return client

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return asyncio.run(self._query(sql, *args))

    async def _query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self.connect()
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def connect(self) -> asyncpg.Connection:
        """A connection of our own to the stack's user database."""
        from llamaserve.config import load_settings
        from llamaserve.store import db

        settings, layout = load_settings(ROOT, runtime=self.project.runtime)
        return await db.connect(settings, layout)

    def row(self, request_id: str) -> asyncpg.Record:
        """The llama_requests row of a request, once the background writer has written it."""
        for _ in range(100):
            rows = self.query("SELECT * FROM llama_requests WHERE request_id = $1", request_id)
            if rows:
                return rows[0]
            subprocess.run(["sleep", "0.1"], check=True)
        raise AssertionError(f"no llama_requests row for {request_id}")


def start_stack(runtime: Path, more_engines: tuple[str, ...] = (), **config: str) -> Stack:
    """The stack of a project in `runtime`; its gateway sends to its engine, then to
    `more_engines`."""
    engine_port, gateway_port = free_port(), free_port()
    project = make_project(
        runtime,
        LLAMA_SERVER_PORT=str(engine_port),
        LLAMA_PROXY_ENABLED="1",
        LLAMA_PROXY_HOST="127.0.0.1",
        LLAMA_PROXY_PORT=str(gateway_port),
        LLAMA_SERVER_BACKEND_URL=",".join((f"http://127.0.0.1:{engine_port}", *more_engines)),
        # The private cluster, whatever the checkout's own .env says.
        POSTGRES_AUTH_HOST="",
        POSTGRES_AUTH_DB="llamaserve",
        POSTGRES_AUTH_USER="llamaserve",
        **config,
    )
    try:
        for step in (["bin/bootstrap_user_cli.sh"], ["bin/user_management_cli.sh", "init-db"]):
            result = run([str(ROOT / step[0]), *step[1:]], project.env)
            assert result.returncode == 0, result.stdout + result.stderr
        started = project.console("start")
        assert started.returncode == 0, started.stdout + started.stderr
    except BaseException:
        project.console("stop")  # what did start (the database, the engine) is not left running
        raise
    key = next(
        line.split("=", 1)[1].strip('"')
        for line in (runtime / "config.env").read_text().splitlines()
        if line.startswith("LLAMA_SERVER_API_KEY=")
    )
    from tests.conftest import default_model

    return Stack(
        project,
        f"http://127.0.0.1:{gateway_port}",
        f"http://127.0.0.1:{engine_port}",
        key,
        default_model().name,
        config.get("LLAMA_ENGINE", Settings.model_fields["llama_engine"].default),
    )


DEFAULT_ENGINE: str = Settings.model_fields["llama_engine"].default


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test of the stack runs on both engines, or on the default one when marked
    `one_engine` (its subject is the gateway, not the engine's answer)."""
    if "stack" in metafunc.fixturenames:
        one = metafunc.definition.get_closest_marker("one_engine") is not None
        engines = (DEFAULT_ENGINE,) if one else ENGINES
        metafunc.parametrize("stack", engines, indirect=True, scope="session")


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The whole stack on one engine (see `pytest_generate_tests`)."""
    # PostgreSQL runs as an unprivileged user: the runtime must be reachable for it.
    base = Path(tempfile.mkdtemp(prefix="llamaserve-stack-"))
    base.chmod(0o755)
    runtime = base / "runtime"
    # A generous default limit: the rate-limit tests give their users limits of their own.
    built = start_stack(runtime, LLAMA_PROXY_RATE_LIMIT="100000", LLAMA_ENGINE=request.param)
    try:
        yield built
    finally:
        close_clients(built.clients)
        built.project.console("stop")
        if not os.environ.get("KEEP_STACK"):  # KEEP_STACK=1 keeps logs for a post-mortem
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def alice(stack: Stack, request: pytest.FixtureRequest) -> str:
    """A fresh user's key, named after the test."""
    name = "u" + str(abs(hash(request.node.nodeid)))[:12]
    return stack.create_user(name)


@pytest.fixture
def mock_engine() -> Iterator[MockEngine]:
    """The mock engine of `site`; a test module asks for other slots by its own."""
    with MockEngine(slots=4) as engine:
        yield engine


@pytest.fixture
def site(pg_database: PgDatabase, mock_engine: MockEngine, monkeypatch: pytest.MonkeyPatch) -> Site:
    """The gateway's world without a model (fast): a fresh database and the mock engine."""
    monkeypatch.setattr(db_status, "status", db_status.DatabaseStatus())  # in-process gateways'
    return new_site(pg_database, mock_engine)
