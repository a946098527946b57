"""When the user database goes away, requests get a clear 503 to retry (never a 500 or a
hang), their log rows wait in the gateway, and everything resumes when it comes back."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from llamaserve.config import load_settings
from llamaserve.ops import cluster
from llamaserve.store import db
from tests.conftest import ROOT, Project, make_project, run
from tests.gateway.helpers import (
    MockEngine,
    assert_envelope,
    gateway_process,
    post,
    running_gateway,
)


@pytest.fixture
def project() -> Iterator[Project]:
    """A project of its own with a private database, whose cluster this test stops."""
    base = Path(tempfile.mkdtemp(prefix="llamaserve-outage-"))
    base.chmod(0o755)  # the cluster runs as an unprivileged user when we are root
    made = make_project(
        base / "runtime",
        LLAMA_PROXY_ENABLED="1",
        POSTGRES_AUTH_HOST="",
        POSTGRES_AUTH_DB="llamaserve",
        POSTGRES_AUTH_USER="llamaserve",
    )
    try:
        for step in (["bin/bootstrap_user_cli.sh"], ["bin/user_management_cli.sh", "init-db"]):
            result = run([str(ROOT / step[0]), *step[1:]], made.env)
            assert result.returncode == 0, result.stdout + result.stderr
        yield made
    finally:
        cluster.stop(load_settings(ROOT, runtime=made.runtime)[1], timeout=30)
        if not os.environ.get("KEEP_STACK"):
            shutil.rmtree(base, ignore_errors=True)


def new_key(project: Project, username: str) -> str:
    cli = [str(ROOT / "bin" / "user_management_cli.sh"), "create-user", "--username", username]
    result = run([*cli, "--json"], project.env)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(json.loads(result.stdout)["key"])


async def log_rows(project: Project, request_ids: list[str]) -> list[asyncpg.Record]:
    settings, layout = load_settings(ROOT, runtime=project.runtime)
    conn = await db.connect(settings, layout)
    try:
        return list(
            await conn.fetch(
                "SELECT request_id, status, outcome FROM llama_requests "
                "WHERE request_id = ANY($1::text[])",
                request_ids,
            )
        )
    finally:
        await conn.close()


def test_a_database_outage_is_a_503_and_nothing_is_lost(project: Project) -> None:
    known, unseen = new_key(project, "known"), new_key(project, "unseen")
    body = '{"model": "mock", "messages": [{"role": "user", "content": "hi"}]}'
    settings, layout = load_settings(ROOT, runtime=project.runtime)
    log = project.runtime / "gateway.log"
    with (
        log.open("wb") as out,
        MockEngine() as engine,
        running_gateway(project.env, out, LLAMA_SERVER_BACKEND_URL=engine.url) as (gateway, _),
    ):
        assert post(gateway, known, body).status_code == 200  # its key is known now

        assert cluster.stop(layout, timeout=30)
        refused = []
        for key in (known, unseen):  # admission, and the key lookup of a key not seen yet
            response = post(gateway, key, body)
            error = assert_envelope(response, 503)
            assert error["code"] == "database_unavailable"
            assert response.headers["retry-after"] == "5"
            refused.append(response.headers["x-request-id"])
        ready = httpx.get(gateway + "/ready", timeout=30)
        assert ready.status_code == 503 and "database" in ready.json()["error"]["message"]

        cluster.ensure_running(settings, layout)
        for key in (known, unseen):
            assert post(gateway, key, body).status_code == 200
        assert httpx.get(gateway + "/ready", timeout=30).status_code == 200

        # The refused requests' rows were kept and written once the database was back.
        rows: list[asyncpg.Record] = []
        for _ in range(50):  # the gateway retries its batch of rows every 0.2 s
            rows = asyncio.run(log_rows(project, refused))
            if len(rows) == len(refused):
                break
            time.sleep(0.2)
        assert sorted(r["request_id"] for r in rows) == sorted(refused)
        assert {(r["status"], r["outcome"]) for r in rows} == {(503, "error")}

    # The log says once that the database went away, where it is and what to do, and
    # once that it is back: not once per request refused, and with no traceback (asyncpg's
    # pool logs one each time it fails to reconnect).
    said = log.read_text()
    assert "Traceback" not in said, said
    [away] = [line for line in said.splitlines() if "until it answers" in line]
    assert "private PostgreSQL cluster" in away or "private cluster in" in away, away
    assert said.count("database: answering again") == 1, said


def test_rows_the_database_cannot_take_at_stop_are_kept_and_written_at_next_start(
    project: Project,
) -> None:
    key = new_key(project, "stopper")
    body = '{"model": "mock", "messages": [{"role": "user", "content": "hi"}]}'
    settings, layout = load_settings(ROOT, runtime=project.runtime)
    spool = project.runtime / "run" / "request-log"
    with MockEngine() as engine:
        with running_gateway(project.env, LLAMA_SERVER_BACKEND_URL=engine.url) as (gateway, proc):
            assert post(gateway, key, body).status_code == 200
            assert cluster.stop(layout, timeout=30)
            refused = [post(gateway, key, body).headers["x-request-id"] for _ in range(3)]
            proc.terminate()  # the stop, while the database is away
            assert proc.wait(timeout=30) == 0
        # Before, these rows were lost in silence.
        [kept] = list(spool.glob("*.jsonl"))
        assert kept.stat().st_mode & 0o777 == 0o600
        assert {json.loads(line)["request_id"] for line in kept.read_text().splitlines()} >= set(
            refused
        )
        cluster.ensure_running(settings, layout)
        with gateway_process(project.env, LLAMA_SERVER_BACKEND_URL=engine.url):
            rows = asyncio.run(log_rows(project, refused))  # written before it is ready
            assert sorted(r["request_id"] for r in rows) == sorted(refused)
            assert not list(spool.glob("*.jsonl"))
