"""What a client writes reaches the request log and the gateway's log as text they can
keep, through the real gateway process on a real PostgreSQL: a path or a model holding
NUL or a lone surrogate is a row like any other (escaped), and a path holding CR LF
is one line of the log, not two."""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llamaserve.config import new_engine_key
from llamaserve.store import users
from tests.gateway.helpers import MockEngine, post, running_gateway
from tests.pgfixtures import PgDatabase

CHAT = '"messages": [{"role": "user", "content": "hi"}]'


@dataclass
class Gateway:
    url: str
    key: str
    log: Path  # what the gateway process wrote on stdout and stderr
    database: PgDatabase

    def rows(self, *request_ids: str) -> dict[str, dict[str, object]]:
        """The llama_requests rows of these requests, once all are written (within 10 s)."""
        found: dict[str, dict[str, object]] = {}
        for _ in range(100):
            found = asyncio.run(_rows(self.database, list(request_ids)))
            if len(found) == len(request_ids):
                break
            time.sleep(0.1)
        return found


async def _rows(database: PgDatabase, ids: list[str]) -> dict[str, dict[str, object]]:
    conn = await database.connect()
    try:
        found = await conn.fetch("SELECT * FROM llama_requests WHERE request_id = ANY($1)", ids)
    finally:
        await conn.close()
    return {r["request_id"]: dict(r) for r in found}


async def _new_user_key(database: PgDatabase) -> str:
    conn = await database.connect()
    try:
        await users.create_user(conn, username="hostile")
        return (await users.create_key(conn, username="hostile")).key
    finally:
        await conn.close()


@pytest.fixture
def gateway(pg_database: PgDatabase, tmp_path: Path) -> Iterator[Gateway]:
    engine = MockEngine().start()
    env = {
        **pg_database.env,
        "LLAMA_SERVER_API_KEY": new_engine_key(),
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_SERVER_BACKEND_URL": engine.url,
    }
    key = asyncio.run(_new_user_key(pg_database))
    log = tmp_path / "gateway.log"
    try:
        with log.open("wb") as out, running_gateway(env, out) as (url, _):
            yield Gateway(url, key, log, pg_database)
    finally:
        engine.kill()


def get(url: str, raw_path: str, key: str | None = None) -> http.client.HTTPResponse:
    """A GET of a path sent as written (an HTTP library might re-encode it)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", raw_path, headers={"Authorization": f"Bearer {key}"} if key else {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_a_path_holding_nul_is_a_row_and_the_next_rows_too(gateway: Gateway) -> None:
    """Before, PostgreSQL refused the batch of `GET /%00` (a client without a key), and the
    gateway retried it for ever: no row was written after it."""
    nul = get(gateway.url, "/%00")
    assert nul.status == 404
    served = httpx.get(
        gateway.url + "/v1/models", headers={"Authorization": f"Bearer {gateway.key}"}
    )
    assert served.status_code == 200
    first, second = nul.headers["x-request-id"], served.headers["x-request-id"]
    rows = gateway.rows(first, second)
    assert set(rows) == {first, second}
    assert (rows[first]["path"], rows[first]["status"]) == ("/\\x00", 404)
    assert rows[first]["error"] == "Unknown path /\\x00."
    assert (rows[second]["path"], rows[second]["status"]) == ("/v1/models", 200)


def test_a_model_holding_nul_or_a_lone_surrogate_is_a_row(gateway: Gateway) -> None:
    """Each request has its row, the next ones too. A body with a lone surrogate is a 400
    since bodies.py (f5c41c5), its model unread; before, the gateway sent it on."""
    answers = {
        model: post(gateway.url, gateway.key, f'{{"model": "{model}", {CHAT}}}')
        for model in ("\\u0000", "\\ud800", "mock")
    }
    rows = gateway.rows(*(answer.headers["x-request-id"] for answer in answers.values()))
    stored = {model: rows[answer.headers["x-request-id"]] for model, answer in answers.items()}
    assert stored["\\u0000"]["model"] == "\\x00" and stored["\\u0000"]["status"] == 200
    assert (stored["\\ud800"]["status"], stored["\\ud800"]["model"]) in {
        (400, None),
        (200, "\\ud800"),
    }
    assert stored["mock"]["model"] == "mock"


def test_a_path_holding_cr_lf_is_one_line_of_the_log(gateway: Gateway) -> None:
    forged = "2026-01-01 00:00:00,000 llamaserve.gateway request id=forged user=admin"
    path = "/v1/x%0d%0a" + forged.replace(" ", "%20") + "%00%c2%85%e2%80%a8%1b[2J"
    request_id = get(gateway.url, path).headers["x-request-id"]
    gateway.rows(request_id)  # its line is written by now: as its row is queued
    lines = gateway.log.read_bytes().decode().splitlines()
    [line] = [line for line in lines if request_id in line]
    assert "/v1/x\\r\\n2026-01-01 00:00:00,000 llamaserve.gateway" in line
    assert "user=admin\\x00\\x85\\u2028\\x1b[2J status=404" in line
    assert not [line for line in lines if line.startswith(forged[:20])]
