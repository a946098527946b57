"""The gateway without a model, for the fast tier: a real PostgreSQL database (see
tests/pgfixtures.py), the mock engine (bench/mock_engine.py), the user CLI on that
database, and the gateway itself in process (its ASGI app over httpx) or as a process
(`extra_gateway`). A `Site` answers as a `Stack` does (`cli`, `create_user`, `query`,
`row`, `env`), so that a test of the gateway alone moves from one to the other as is.
Its users are made through the store; `cli` is for the tests whose subject is the CLI's
effect on a running gateway."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import httpx
from bench.mock_engine import MockEngine

from llamaserve.config import Settings, new_engine_key
from llamaserve.gateway.app import Gateway
from llamaserve.store import users
from tests.conftest import ROOT, run
from tests.pgfixtures import PgDatabase

T = TypeVar("T")
RATE_LIMIT = "100000"  # the stack's generous default: the rate-limit tests set their own


@dataclass
class Site:
    database: PgDatabase
    engine: MockEngine
    engine_key: str

    @property
    def env(self) -> dict[str, str]:
        """The environment of a CLI or gateway process on this site."""
        return {
            **self.database.env,
            "LLAMA_SERVER_API_KEY": self.engine_key,
            "LLAMA_SERVER_BACKEND_URL": self.engine.url,
            "LLAMA_PROXY_HOST": "127.0.0.1",
            "LLAMA_PROXY_RATE_LIMIT": RATE_LIMIT,
        }

    def settings(self, **overrides: Any) -> Settings:
        """The settings of an in-process gateway on this site."""
        values: dict[str, Any] = {
            "llama_server_api_key": self.engine_key,
            "llama_server_backend_url": self.engine.url,
            "llama_proxy_rate_limit": int(RATE_LIMIT),
            **overrides,
        }
        return self.database.cluster.settings(self.database.name, **values)

    @asynccontextmanager
    async def gateway(self, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        """A client of a gateway in this process (its lifespan run), from 127.0.0.1."""
        app = Gateway(self.settings(**overrides), self.database.layout)
        await app.startup()
        try:
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gateway", timeout=60
            ) as client:
                yield client
        finally:
            await app.shutdown()
            gc.unfreeze()  # startup froze what existed: a test's garbage is collected again

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([str(ROOT / "bin" / "user_management_cli.sh"), *args], self.env)

    def create_user(self, username: str, *options: str) -> str:
        """A new user, made through the store as the CLI makes one (without the CLI's
        start-up time); returns their key. Options as the CLI's: --rate-limit, --window."""
        given = dict(zip(options[::2], options[1::2], strict=True))
        assert set(given) <= {"--rate-limit", "--window"}, given
        limits = {name: int(value) for name, value in given.items()}

        async def create() -> str:
            conn = await self.connect()
            try:
                await users.create_user(
                    conn,
                    username=username,
                    rate_limit=limits.get("--rate-limit"),
                    rate_window_seconds=limits.get("--window"),
                )
                return (await users.create_key(conn, username=username)).key
            finally:
                await conn.close()

        return _blocking(create)

    async def connect(self) -> asyncpg.Connection:
        return await self.database.connect()

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return asyncio.run(self.fetch(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self.connect()
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    def row(self, request_id: str) -> asyncpg.Record:
        """The llama_requests row of a request, once the background writer has written it."""
        for _ in range(100):
            rows = self.query("SELECT * FROM llama_requests WHERE request_id = $1", request_id)
            if rows:
                return rows[0]
            time.sleep(0.1)
        raise AssertionError(f"no llama_requests row for {request_id}")

    async def logged(self, request_id: str) -> asyncpg.Record:
        """`row`, from a test that runs in an event loop."""
        for _ in range(100):
            rows = await self.fetch("SELECT * FROM llama_requests WHERE request_id = $1",
                                    request_id)  # fmt: skip
            if rows:
                return rows[0]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no llama_requests row for {request_id}")


def _blocking(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """The result of `work`, also from a test that runs in an event loop (in a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work()).result()


def new_site(database: PgDatabase, engine: MockEngine) -> Site:
    key = new_engine_key()
    engine.api_key = key  # the Responses and Messages APIs too, as a real engine serves them
    return Site(database, engine, key)
