"""A real Prometheus (Debian's `prometheus`) scraping a gateway process with the
operator's key: what it reads back through its HTTP API equals the request log, per
user, and its latency histogram counts every request. A scrape with a user's key fails.
With the mock engine in the fast tier, and with the real model in the slow one."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.gateway.conftest import Stack
from tests.gateway.harness import Site
from tests.gateway.helpers import extra_gateway
from tests.gateway.helpers import mock_request as chat
from tests.programs import need_program

ADMIN = "adm-" + "p" * 40
SETTLE_SECONDS = 60  # for the last rows to be written and scraped


def scrape_config(gateway: str, admin_key: str, user_key: str) -> str:
    """Prometheus' config: the gateway scraped every second with the operator's key, and
    once more with a user's (which must fail)."""
    target = gateway.removeprefix("http://")
    jobs = [("llamaserve", admin_key), ("as-a-user", user_key)]
    return "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n" + "".join(
        f"  - job_name: {job}\n"
        f"    authorization: {{type: Bearer, credentials: {key}}}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
        for job, key in jobs
    )


@contextlib.contextmanager
def prometheus(config: str, where: Path) -> Iterator[str]:
    """A Prometheus server on a free loopback port, with its config and data in `where`;
    its URL once ready."""
    program = need_program("prometheus")
    (where / "prometheus.yml").write_text(config)
    port = free_port()
    with open(where / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [program, f"--config.file={where / 'prometheus.yml'}",
             f"--storage.tsdb.path={where / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait(lambda: ready(url) or proc.poll() is not None, 30)
            assert proc.poll() is None, (where / "prometheus.log").read_text()
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    return False


def wait(condition: Callable[[], Any], timeout: float) -> Any:
    """The first true value of `condition`, polled until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            return result
        time.sleep(0.25)
    return result


def query(url: str, promql: str) -> dict[str, float]:
    """An instant query's vector, by its `user` label ('' when it has none)."""
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return {r["metric"].get("user", ""): float(r["value"][1]) for r in answer["data"]["result"]}


def log_sums(deployment: Site | Stack, users: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per user, the request log's sums: prompt and completion tokens, and rows."""
    rows = deployment.query(
        "SELECT username, sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion, "
        "count(*) AS requests FROM llama_requests WHERE username = ANY($1) GROUP BY username",
        list(users),
    )
    return {
        r["username"]: {k: float(r[k] or 0) for k in ("prompt", "completion", "requests")}
        for r in rows
    }


def read_back(url: str, users: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """What Prometheus has, per user, in the shape of `log_sums`."""
    found = {
        "prompt": query(url, 'sum by (user) (llamaserve_prompt_tokens_total{job="llamaserve"})'),
        "completion": query(
            url, 'sum by (user) (llamaserve_completion_tokens_total{job="llamaserve"})'
        ),
        "requests": query(url, 'sum by (user) (llamaserve_requests_total{job="llamaserve"})'),
    }
    return {user: {k: found[k].get(user, 0.0) for k in found} for user in users}


def check_against_the_log(
    deployment: Site | Stack, gateway: str, where: Path, send: Callable[[str], int]
) -> None:
    """Prometheus scrapes `gateway` while `send` sends its requests (as two users, whose
    names it returns in `USERS`, and how many requests it sent); then what it reads back
    equals the request log."""
    user_key = deployment.create_user("prom-outsider")
    with prometheus(scrape_config(gateway, ADMIN, user_key), where) as url:
        sent = send(gateway)
        logged = wait(lambda: sum(s["requests"] for s in log_sums(deployment, USERS).values())
                      == sent, SETTLE_SECONDS)  # fmt: skip
        assert logged, log_sums(deployment, USERS)
        expected = log_sums(deployment, USERS)
        assert all(expected[user]["prompt"] and expected[user]["completion"] for user in USERS)
        assert wait(lambda: read_back(url, USERS) == expected, SETTLE_SECONDS), (
            read_back(url, USERS), expected)  # fmt: skip
        latency = 'sum(llamaserve_request_duration_seconds_count{job="llamaserve"})'
        assert query(url, latency) == {"": sent}
        assert query(url, 'up{job="llamaserve"}') == {"": 1.0}
        # The other job's first scrape may come later in the interval than the first's.
        assert wait(lambda: query(url, 'up{job="as-a-user"}'), 30) == {"": 0.0}


USERS = ("prom-alice", "prom-bob")


def test_prometheus_reads_what_the_request_log_holds(site: Site, tmp_path: Path) -> None:
    alice, bob = (site.create_user(name) for name in USERS)

    def send(gateway: str) -> int:
        sent = 0
        with httpx.Client(base_url=gateway, timeout=60) as client:
            for key, count in ((alice, 4), (bob, 2)):
                for i in range(count):
                    body = chat(f"p{i}", stream=i % 2 == 1)
                    answer = client.post("/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                    assert answer.status_code == 200, answer.text
                    sent += 1
            # A stream its client leaves: cancelled, logged, counted all the same.
            with client.stream("POST", "/v1/chat/completions", json=chat("cut", 2, stream=True),
                               headers={"Authorization": f"Bearer {bob}"}):  # fmt: skip
                pass
            sent += 1
        return sent

    with extra_gateway(site, LLAMA_ADMIN_API_KEY=ADMIN) as gateway:
        check_against_the_log(site, gateway, tmp_path, send)
    [cut] = site.query("SELECT outcome FROM llama_requests WHERE username = $1 AND stream "
                       "ORDER BY created_at DESC LIMIT 1", "prom-bob")  # fmt: skip
    assert cut["outcome"] == "cancelled"


@pytest.mark.one_engine
def test_prometheus_reads_the_real_models_tokens(stack: Stack, tmp_path: Path) -> None:
    """The same with the real model: its own token counts, a stream cut short included
    (its tokens read back from the engine)."""
    keys = [stack.create_user(name) for name in USERS]
    messages = [{"role": "user", "content": "Count from one to twenty."}]

    def send(gateway: str) -> int:
        sent = 0
        with httpx.Client(base_url=gateway, timeout=300) as client:
            for key, stream in ((keys[0], False), (keys[0], True), (keys[1], False)):
                body = {"model": stack.model, "messages": messages, "max_tokens": 8,
                        "stream": stream}  # fmt: skip
                answer = client.post("/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                assert answer.status_code == 200, answer.text
                sent += 1
            body = {"model": stack.model, "messages": messages, "max_tokens": 200, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {keys[1]}"}) as cut:  # fmt: skip
                lines = cut.iter_lines()
                while not next(lines).startswith("data: {"):
                    pass
            sent += 1
        return sent

    with extra_gateway(stack, LLAMA_ADMIN_API_KEY=ADMIN) as gateway:
        check_against_the_log(stack, gateway, tmp_path, send)
