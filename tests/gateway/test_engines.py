"""Queues, several engines, an engine that dies: through a real gateway and database,
with mock engines (the faults are the subject); then `console.sh status` and a gateway
alone, with the real engine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from llamaserve.config import Layout, load_settings
from llamaserve.gateway.engines import PROBE_SECONDS
from llamaserve.store import db
from tests.conftest import ROOT, free_port, make_project
from tests.gateway.conftest import Stack, start_stack
from tests.gateway.harness import Site
from tests.gateway.helpers import MockEngine, extra_gateway
from tests.gateway.helpers import mock_request as body


async def send_all(url: str, calls: list[tuple[str, dict[str, object]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        tasks = []
        for key, payload in calls:
            tasks.append(asyncio.create_task(client.post(
                f"{url}/v1/chat/completions", json=payload,
                headers={"Authorization": f"Bearer {key}"},
            )))  # fmt: skip
            await asyncio.sleep(0.05)  # arrive in this order
        return list(await asyncio.gather(*tasks))


@pytest.fixture
def mock_engine() -> Iterator[MockEngine]:
    with MockEngine(slots=1) as mock:
        yield mock


@pytest.fixture
def engine(site: Site) -> MockEngine:
    return site.engine


def test_a_light_user_is_not_queued_behind_a_heavy_one(site: Site, engine: MockEngine) -> None:
    heavy, light = site.create_user("heavy-e2e"), site.create_user("light-e2e")
    calls = [(heavy, body(f"h{i}", 0.3)) for i in range(6)] + [(light, body("l1", 0.3))]
    with extra_gateway(site, LLAMA_SERVER_BACKEND_URL=engine.url) as url:
        responses = asyncio.run(send_all(url, calls))
    assert all(r.status_code == 200 for r in responses)
    # When l1 arrives, one of h's requests is generating (h0, or h1 if h0 just ended) and
    # the others wait: l1 is next, before all of them.
    assert engine.arrivals.index("l1") <= 2 and engine.arrivals[-1] != "l1"
    row = site.row(responses[-1].headers["x-request-id"])
    assert row["queue_ms"] is not None and row["queue_ms"] > 0


def test_queue_bounds_answer_429_and_503_in_the_envelope(site: Site, engine: MockEngine) -> None:
    a, b = site.create_user("bounds-a"), site.create_user("bounds-b")
    calls = [(a, body(f"a{i}", 0.5)) for i in range(4)] + [(b, body("b1")), (b, body("b2"))]
    bounds = {"LLAMA_PROXY_USER_QUEUE_SIZE": "2", "LLAMA_PROXY_QUEUE_SIZE": "3"}
    with extra_gateway(site, LLAMA_SERVER_BACKEND_URL=engine.url, **bounds) as url:
        responses = asyncio.run(send_all(url, calls))
    statuses = [r.status_code for r in responses]
    # a0 runs, a1 a2 wait, a3 exceeds a's queue; b1 fills the server's queue, b2 exceeds it.
    assert statuses == [200, 200, 200, 429, 200, 503]
    for refused in (responses[3], responses[5]):
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert int(refused.headers["retry-after"]) > 0


def test_waiting_too_long_is_503(site: Site, engine: MockEngine) -> None:
    a, b = site.create_user("patient-a"), site.create_user("patient-b")
    with extra_gateway(site, LLAMA_SERVER_BACKEND_URL=engine.url,
                       LLAMA_PROXY_QUEUE_TIMEOUT="0.3") as url:  # fmt: skip
        responses = asyncio.run(send_all(url, [(a, body("a", 1.5)), (b, body("b"))]))
    assert [r.status_code for r in responses] == [200, 503]
    assert responses[1].json()["error"]["code"] == "queue_timeout"
    row = site.row(responses[1].headers["x-request-id"])  # the wait is logged (was NULL)
    assert (row["outcome"], row["status"]) == ("error", 503) and row["queue_ms"] > 250  # of 300


def test_a_key_revoked_while_its_requests_wait_sends_none_of_them(
    site: Site, engine: MockEngine
) -> None:
    """A leaked key's backlog: revoked while its requests wait in the queue, none of them
    reaches the engine (the one already generating finishes)."""
    key = site.create_user("revoked-backlog")
    calls = [(key, body("running", 2.5))] + [(key, body(f"queued{i}")) for i in range(3)]

    async def revoke_meanwhile(url: str) -> list[httpx.Response]:
        sending = asyncio.create_task(send_all(url, calls))
        await asyncio.sleep(1.0)  # the first generates, the others wait for its slot
        revoked = await asyncio.to_thread(site.cli, "revoke-key", "--key-id", key.split("_")[1])
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        return await sending

    with extra_gateway(site, LLAMA_SERVER_BACKEND_URL=engine.url) as url:
        responses = asyncio.run(revoke_meanwhile(url))
    assert [r.status_code for r in responses] == [200, 401, 401, 401]
    assert {r.json()["error"]["code"] for r in responses[1:]} == {"key_revoked"}
    assert engine.arrivals == ["running"]
    rows = [site.row(r.headers["x-request-id"]) for r in responses[1:]]
    assert {(row["status"], row["outcome"], row["engine"]) for row in rows} == {
        (401, "rejected", None)
    }


def test_a_client_gone_while_queued_never_reaches_the_engine(
    site: Site, engine: MockEngine
) -> None:
    a, b, c = (site.create_user(f"leaver-{n}") for n in "abc")

    async def scenario(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:

            def post(key: str, payload: dict[str, object]) -> asyncio.Task[httpx.Response]:
                return asyncio.create_task(client.post(
                    f"{url}/v1/chat/completions", json=payload,
                    headers={"Authorization": f"Bearer {key}"}))  # fmt: skip

            first = post(a, body("a", 0.8))
            await asyncio.sleep(0.2)
            leaver = post(b, body("b"))
            await asyncio.sleep(0.2)
            last = post(c, body("c"))
            await asyncio.sleep(0.1)
            leaver.cancel()  # b's client goes away while queued
            return [await first, await last]

    with extra_gateway(site, LLAMA_SERVER_BACKEND_URL=engine.url) as url:
        responses = asyncio.run(scenario(url))
    assert [r.status_code for r in responses] == [200, 200]
    assert engine.arrivals == ["a", "c"]
    cancelled = site.query("SELECT outcome, status FROM llama_requests WHERE username = 'leaver-b'")
    assert [(r["outcome"], r["status"]) for r in cancelled] == [("cancelled", 499)]


def test_requests_route_around_a_killed_engine_and_retry_once(site: Site) -> None:
    key = site.create_user("two-engines")
    first, second = MockEngine(slots=1).start(), MockEngine(slots=1).start()
    backends = f"{first.url},{second.url}"
    try:
        with extra_gateway(site, LLAMA_SERVER_BACKEND_URL=backends,
                           LLAMA_PROXY_HEALTH_INTERVAL="0.3") as url:  # fmt: skip
            first.kill()  # the gateway still believes it healthy: the first request fails on it
            responses = asyncio.run(send_all(url, [(key, body(f"r{i}")) for i in range(6)]))
            assert [r.status_code for r in responses] == [200] * 6
            assert Counter(second.arrivals) == Counter(f"r{i}" for i in range(6))
            rows = [site.row(r.headers["x-request-id"]) for r in responses]
            assert all(row["outcome"] == "ok" for row in rows)
            assert {row["engine"] for row in rows} == {second.url}  # where each was served
            ready = httpx.get(f"{url}/ready")
            assert ready.status_code == 200  # one engine is enough
            second.kill()
            down = httpx.post(f"{url}/v1/chat/completions", json=body("x"),
                              headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            assert down.status_code == 503
            assert json.loads(down.text)["error"]["type"] == "service_unavailable"
            assert site.row(down.headers["x-request-id"])["engine"] is None  # none had it
    finally:
        for mock in (first, second):
            if mock._thread is not None and mock._thread.is_alive():
                mock.kill()


def test_an_engine_that_hangs_is_taken_out(site: Site) -> None:
    """An engine that takes connections and answers nothing (stopped, wedged): its health
    probe fails within PROBE_SECONDS, and new requests go to the other engine. Before,
    the probe waited for LLAMA_PROXY_UPSTREAM_TIMEOUT (10 minutes): the engine was never
    taken out, half the requests hung, and /ready hung with them."""
    key = site.create_user("hung-engine")
    first, second = MockEngine(slots=1).start(), MockEngine(slots=1).start()
    try:
        with extra_gateway(site, LLAMA_SERVER_BACKEND_URL=f"{first.url},{second.url}",
                           LLAMA_PROXY_HEALTH_INTERVAL="0.5") as url:  # fmt: skip
            first.hung = True
            time.sleep(PROBE_SECONDS + 1.5)  # a probe of it times out
            began = time.monotonic()
            assert httpx.get(f"{url}/ready", timeout=30).status_code == 200  # one is enough
            assert time.monotonic() - began < PROBE_SECONDS + 1
            responses = asyncio.run(send_all(url, [(key, body(f"h{i}")) for i in range(4)]))
            assert [r.status_code for r in responses] == [200] * 4
            assert first.arrivals == [] and sorted(second.arrivals) == [f"h{i}" for i in range(4)]
            first.hung = False  # it answers again: it is probed back in
            time.sleep(1.5)
            responses = asyncio.run(send_all(url, [(key, body(f"b{i}")) for i in range(4)]))
            assert [r.status_code for r in responses] == [200] * 4 and first.arrivals
    finally:
        first.hung = False
        for mock in (first, second):
            mock.kill()


@pytest.mark.slow  # it starts a stack of its own
def test_status_says_which_engine_is_out() -> None:
    base = Path(tempfile.mkdtemp(prefix="llamaserve-status-"))
    base.chmod(0o755)  # the cluster runs as an unprivileged user when we are root
    out = f"http://127.0.0.1:{free_port()}"  # an engine that does not run
    stack = start_stack(base / "runtime", more_engines=(out,))
    try:
        status = stack.project.console("status")
        assert status.returncode == 0, status.stdout + status.stderr
        lines = dict(line.split(": ", 1) for line in status.stdout.strip().splitlines())
        slots = httpx.get(stack.engine_url + "/health").json()["slots"]
        assert lines["engine"].startswith("running") and lines["engine"].endswith(", answering")
        assert lines["gateway"].startswith("running") and lines["gateway"].endswith(", ready")
        assert lines[f"backend {stack.engine_url}"] == f"answering, {slots} slots"
        assert lines[f"backend {out}"] == "not answering: connection refused"

        # The engine stops (SIGTERM, as a crash or an operator would).
        pid = json.loads((stack.project.runtime / "run" / "engine.pid").read_text())["pid"]
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            status = stack.project.console("status")
            lines = dict(line.split(": ", 1) for line in status.stdout.strip().splitlines())
            if lines["engine"] == "stopped (stale pidfile)":
                break
            time.sleep(0.1)
        assert status.returncode == 3 and lines["engine"] == "stopped (stale pidfile)"
        assert lines["gateway"].endswith(", not ready: engine: not reachable"), lines
        assert lines[f"backend {stack.engine_url}"] == "not answering: connection refused"
    finally:
        stack.project.console("stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.one_engine
def test_a_gateway_on_a_machine_of_its_own(stack: Stack) -> None:
    """LLAMA_ENGINE_ENABLED=0: console.sh runs only a gateway, here a second one on the
    stack's database, in front of the stack's engine (as if on another machine)."""
    base = Path(tempfile.mkdtemp(prefix="llamaserve-gateway-only-"))
    port = free_port()
    project = make_project(
        base / "runtime",
        LLAMA_ENGINE_ENABLED="0",
        LLAMA_PROXY_ENABLED="1",
        LLAMA_PROXY_HOST="127.0.0.1",
        LLAMA_PROXY_PORT=str(port),
        LLAMA_SERVER_BACKEND_URL=stack.engine_url,
        LLAMA_SERVER_API_KEY=stack.engine_key,
        POSTGRES_AUTH_HOST=str(db.socket_dir(stack_layout(stack))),
        POSTGRES_AUTH_DB="llamaserve",
        POSTGRES_AUTH_USER="llamaserve",
    )
    try:
        started = project.console("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "starting engine" not in started.stdout
        assert not (project.runtime / "run" / "engine.pid").exists()
        status = project.console("status")
        lines = dict(line.split(": ", 1) for line in status.stdout.strip().splitlines())
        assert status.returncode == 0 and "engine" not in lines, status.stdout
        assert lines["gateway"].endswith(", ready")
        assert lines[f"backend {stack.engine_url}"].startswith("answering")

        key = stack.create_user("elsewhere")  # one database: a user of every gateway
        with OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=stack.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        assert raw.parse().choices[0].finish_reason in ("stop", "length")
        assert stack.row(raw.headers["x-request-id"])["engine"] == stack.engine_url

        stopped = project.console("stop")
        assert "gateway stopped" in stopped.stdout and "engine" not in stopped.stdout
    finally:
        project.console("stop")
        shutil.rmtree(base, ignore_errors=True)


def stack_layout(stack: Stack) -> Layout:
    return load_settings(ROOT, runtime=stack.project.runtime)[1]
