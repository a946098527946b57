"""Extra gateway processes on a stack's or a site's database, and what the gateway tests
check of an answer. The mock engine is bench/mock_engine.py's."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Protocol

import httpx
from bench.mock_engine import MockEngine, mock_request

from llamaserve.ops.readiness import Start, wait_until_ready
from tests.conftest import ENVELOPE, ROOT, free_port

__all__ = ["MockEngine", "mock_request"]  # where the gateway tests have long found them


class Deployment(Protocol):
    """A stack (tests/gateway/conftest.py) or a site (tests/gateway/harness.py)."""

    @property
    def env(self) -> dict[str, str]: ...


@contextmanager
def extra_gateway(deployment: Deployment, **env: str) -> Iterator[str]:
    """Another gateway process on the same database, with settings overridden by env."""
    with gateway_process(deployment.env, **env) as url:
        yield url


@contextmanager
def gateway_process(project_env: dict[str, str], **env: str) -> Iterator[str]:
    """A gateway process of a project (its environment), on a port of its own."""
    with running_gateway(project_env, **env) as (url, _):
        yield url


@contextmanager
def running_gateway(
    project_env: dict[str, str], log: IO[bytes] | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A gateway process and its URL, stopped (SIGTERM) at the end if still running. Its
    log goes to a file (`log`, or a temporary one), not a pipe: a pipe nobody reads
    stalls the gateway once full."""
    port = free_port()
    with contextlib.ExitStack() as files:
        out = log or files.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(
            [sys.executable, "-m", "llamaserve", "serve-gateway"],
            cwd=ROOT,
            env={**project_env, "LLAMA_PROXY_PORT": str(port), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            start = wait_until_ready(url + "/health", proc, 30)
            if start is Start.EXITED:
                out.seek(0)
                raise AssertionError(f"gateway exited: {out.read().decode(errors='replace')}")
            assert start is Start.READY, f"{url} never answered"
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def assert_envelope(
    response: httpx.Response, status: int, proxied: bool = True
) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["content-length"]) == len(response.content)
    error = response.json()["error"]
    assert set(error) == ENVELOPE and isinstance(error["message"], str) and error["message"]
    assert not proxied or response.headers["x-request-id"]
    return error  # type: ignore[no-any-return]


def post(
    url: str, key: str, content: bytes | str, path: str = "/v1/chat/completions"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(url + path, content=content, headers=headers, timeout=60)
