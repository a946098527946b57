"""The gateway's `/metrics`, in process on a real database with the mock engine (8 prompt
tokens and 1 completion token per request): only the operator reads it; its counters
equal the request log's sums; refusals by reason; the live gauges of the queue, the
engines, the quotas and the request log's backlog; and without the `user` label. The
same read through a real Prometheus: test_prometheus.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamaserve.config import Settings
from llamaserve.gateway.admission import Admissions
from llamaserve.gateway.logbook import RequestLog
from llamaserve.gateway.metrics import Metrics
from llamaserve.gateway.scheduling import EngineState, QueueLimits, Scheduler
from llamaserve.store import users
from tests.gateway.harness import Site
from tests.gateway.helpers import MockEngine, assert_envelope
from tests.gateway.helpers import mock_request as chat

pytestmark = pytest.mark.anyio

ADMIN = "adm-" + "k" * 40
AS_OPERATOR = {"Authorization": f"Bearer {ADMIN}"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def mock_engine() -> Iterator[MockEngine]:
    """One slot: a second request waits in the gateway's fair queue."""
    with MockEngine(slots=1) as engine:
        yield engine


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(gateway: httpx.AsyncClient) -> Samples:
    answer = await gateway.get("/metrics", headers=AS_OPERATOR)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_only_the_operator_reads_the_metrics(site: Site) -> None:
    key = site.create_user("metrics-user")
    async with site.gateway(llama_admin_api_key=ADMIN) as gateway:
        nobody = await gateway.get("/metrics")
        wrong = await gateway.get("/metrics", headers=bearer(ADMIN + "x"))
        user = await gateway.get("/metrics", headers=bearer(key))
        posted = await gateway.post("/metrics", headers=AS_OPERATOR)
        samples = await scrape(gateway)
    assert assert_envelope(nobody, 401, proxied=False)["code"] == "missing_api_key"
    assert assert_envelope(wrong, 401, proxied=False)["code"] == "invalid_api_key"
    assert assert_envelope(user, 403, proxied=False)["code"] == "admin_key_required"
    assert_envelope(posted, 405, proxied=False)
    assert ("llamaserve_request_log_rows_waiting", frozenset()) in samples
    # Refused scrapes are not requests of the API: none was counted, nor logged.
    assert total(samples, "llamaserve_requests_total") == 0


async def test_without_an_admin_key_nobody_reads_them(site: Site) -> None:
    async with site.gateway() as gateway:
        refused = await gateway.get("/metrics", headers=bearer(""))
    assert_envelope(refused, 401, proxied=False)


async def test_the_counters_equal_the_request_log(site: Site) -> None:
    alice, bob = site.create_user("m-alice"), site.create_user("m-bob")
    async with site.gateway(llama_admin_api_key=ADMIN) as gateway:
        for i in range(3):
            await gateway.post("/v1/chat/completions", json=chat(f"a{i}"), headers=bearer(alice))
        streamed = await gateway.post("/v1/chat/completions", json=chat("a-s", stream=True),
                                      headers=bearer(alice))  # fmt: skip
        await gateway.post("/v1/chat/completions", json=chat("b0"), headers=bearer(bob))
        await gateway.get("/v1/models", headers=bearer(bob))
        await gateway.get("/v1/responses/resp_unknown", headers=bearer(bob))
        await gateway.get("/v1/nowhere", headers=bearer(bob))
        await gateway.get("/v1/models")  # no key: no user
        samples = await scrape(gateway)
        rows = await wait_for_rows(site, 9)
    assert streamed.status_code == 200
    for name in ("m-alice", "m-bob"):
        prompt, completion = (
            sum(r[column] or 0 for r in rows if r["username"] == name)
            for column in ("prompt_tokens", "completion_tokens")
        )
        assert prompt and completion
        assert value(samples, "llamaserve_prompt_tokens_total", user=name) == prompt
        assert value(samples, "llamaserve_completion_tokens_total", user=name) == completion
        requests = total(samples, "llamaserve_requests_total", user=name)
        assert requests == sum(r["username"] == name for r in rows)
    chats = dict(path="/v1/chat/completions", outcome="ok", status="2xx")
    assert value(samples, "llamaserve_requests_total", user="m-alice", **chats) == 4
    for path, status in (("/v1/responses/{id}", "4xx"), ("/v1/models", "2xx")):
        assert total(samples, "llamaserve_requests_total", user="m-bob", path=path,
                     status=status) == 1, path  # fmt: skip
    # Refused before their user is known: no user; a path that is no route: `other`.
    for path in ("/v1/models", "other"):
        nobody = dict(user="(none)", path=path, outcome="rejected", status="4xx")
        assert value(samples, "llamaserve_requests_total", **nobody) == 1, path
    latency = "llamaserve_request_duration_seconds_count"
    assert total(samples, latency) == len(rows) == 9
    assert value(samples, latency, path="/v1/chat/completions") == 5
    # Time to first token: the stream only; queue wait: every chat completion.
    assert total(samples, "llamaserve_time_to_first_token_seconds_count") == 1
    assert value(samples, "llamaserve_queue_wait_seconds_count", path="/v1/chat/completions") == 5


async def wait_for_rows(site: Site, count: int) -> list[dict[str, object]]:
    for _ in range(100):
        rows = await site.fetch("SELECT * FROM llama_requests")
        if len(rows) >= count:
            return [dict(row) for row in rows]
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} rows were written")


async def test_refusals_are_counted_by_reason_with_the_quotas(site: Site) -> None:
    limited = site.create_user("m-limited", "--rate-limit", "1", "--window", "600")
    metered, tpm = site.create_user("m-metered"), site.create_user("m-tpm")
    conn = await site.connect()
    try:
        await users.set_quota(conn, username="m-metered", token_quota=9, period="day")
        await users.set_token_rate_limit(conn, username="m-tpm", token_rate_limit=1)
    finally:
        await conn.close()
    async with site.gateway(llama_admin_api_key=ADMIN) as gateway:
        for _ in range(2):  # each: one passes, then one is refused
            for key in (limited, metered, tpm):
                body = {**chat("r"), "max_tokens": 1}
                await gateway.post("/v1/chat/completions", json=body, headers=bearer(key))
            await asyncio.sleep(0.5)  # the tokens are charged in the background
        samples = await scrape(gateway)
    refusals = "llamaserve_refusals_total"
    assert value(samples, refusals, user="m-limited", reason="rate_limit") == 1
    assert value(samples, refusals, user="m-metered", reason="quota") == 1
    assert value(samples, refusals, user="m-tpm", reason="token_rate_limit") == 1
    assert total(samples, refusals) == 3
    assert value(samples, "llamaserve_quota_tokens", user="m-metered") == 9
    # Charged the tokens of its rows (one sent ahead of its refusal may have some too).
    [charged] = await site.fetch("SELECT sum(prompt_tokens + completion_tokens) FROM "
                                 "llama_requests WHERE username = 'm-metered'")  # fmt: skip
    assert value(samples, "llamaserve_quota_used_tokens", user="m-metered") == charged[0] >= 9
    assert value(samples, "llamaserve_quota_left_tokens", user="m-metered") == 0
    assert ("llamaserve_quota_tokens", frozenset({("user", "m-tpm")})) not in samples


async def test_the_queue_and_the_engines_are_read_as_they_are(
    site: Site, mock_engine: MockEngine
) -> None:
    alice, bob = site.create_user("q-alice"), site.create_user("q-bob")
    async with site.gateway(llama_admin_api_key=ADMIN) as gateway:
        first = asyncio.ensure_future(gateway.post(
            "/v1/chat/completions", json=chat("slow", delay=3), headers=bearer(alice)))  # fmt: skip
        while not mock_engine.arrivals:
            await asyncio.sleep(0.02)
        second = asyncio.ensure_future(gateway.post(
            "/v1/chat/completions", json=chat("waits"), headers=bearer(bob)))  # fmt: skip
        await asyncio.sleep(0.3)
        busy = await scrape(gateway)
        await asyncio.gather(first, second)
        idle = await scrape(gateway)
    engine = {"engine": mock_engine.url}
    assert value(busy, "llamaserve_requests_generating", user="q-alice") == 1
    assert value(busy, "llamaserve_queue_depth", user="q-bob") == 1
    assert value(busy, "llamaserve_engine_slots_busy", **engine) == 1
    assert value(busy, "llamaserve_engine_slots", **engine) == 1
    assert value(busy, "llamaserve_engine_up", **engine) == 1
    assert total(idle, "llamaserve_requests_generating") == 0
    assert total(idle, "llamaserve_queue_depth") == 0
    assert value(idle, "llamaserve_engine_slots_busy", **engine) == 0
    assert value(idle, "llamaserve_queue_wait_seconds_count", path="/v1/chat/completions") == 2


async def test_the_user_label_can_be_left_out(site: Site) -> None:
    key = site.create_user("m-anon")
    async with site.gateway(llama_admin_api_key=ADMIN,
                            llama_proxy_metrics_user_label=False) as gateway:  # fmt: skip
        for i in range(2):
            await gateway.post("/v1/chat/completions", json=chat(f"x{i}"), headers=bearer(key))
        samples = await scrape(gateway)
    assert not [labels for _, labels in samples if "user" in dict(labels)]
    assert value(samples, "llamaserve_prompt_tokens_total") == 16
    assert value(samples, "llamaserve_completion_tokens_total") == 2
    chats = dict(path="/v1/chat/completions", outcome="ok", status="2xx")
    assert value(samples, "llamaserve_requests_total", **chats) == 2


def test_the_request_logs_backlog_is_counted(tmp_path: Path) -> None:
    spool = tmp_path / "request-log"
    log = RequestLog(None, spool)
    assert (log.waiting, log.spooled()) == (0, 0)
    spool.mkdir()
    kept = spool / "20260101-000000-1-abc.jsonl"
    kept.write_text("{}\n{}\n{}\n")
    (spool / "rejected").mkdir()  # rows set aside are not waiting for the database
    (spool / "rejected" / "x.jsonl").write_text("{}\n")
    assert log.spooled() == 3
    kept.write_text("{}\n")  # rewritten with the rows not written yet
    os.utime(kept, ns=(1, 1))
    assert log.spooled() == 1
    kept.unlink()
    assert log.spooled() == 0


class _NoDatabase:
    """A pool whose database does not answer."""

    def acquire(self) -> Any:
        raise OSError("connection refused")


async def test_a_scrape_answers_without_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(_env_file=None, llama_admin_api_key=ADMIN)  # type: ignore[call-arg]
    metrics = Metrics(settings)
    scheduler = Scheduler([EngineState("http://127.0.0.1:9")], QueueLimits())
    admissions = Admissions(_NoDatabase(), 0, 60)
    metrics.watch(scheduler, admissions, RequestLog(None, tmp_path), _NoDatabase(), settings)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics",
             "headers": [(b"authorization", f"Bearer {ADMIN}".encode())]}  # fmt: skip
    await metrics.serve(scope, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 200
    samples = parse(b"".join(m.get("body", b"") for m in sent[1:]).decode())
    assert value(samples, "llamaserve_engine_up", engine="http://127.0.0.1:9") == 1
    assert not [name for name, _ in samples if name.startswith("llamaserve_quota")]
    assert "quotas not read" in caplog.text
