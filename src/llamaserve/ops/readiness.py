"""Waiting for a process we started until its URL answers 200, and asking a URL how it
is, with the one client to our servers (`http.upstream`)."""

from __future__ import annotations

import asyncio
import enum
import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from llamaserve.errors import APIError
from llamaserve.http.upstream import Upstream, why


class Start(enum.Enum):
    READY = "ready"
    EXITED = "exited"  # the process ended first
    TIMED_OUT = "timed out"


def wait_until_ready(
    url: str,
    proc: subprocess.Popen[Any],
    timeout: float,
    *,
    key: SecretStr | None = None,
    interval: float = 0.1,
) -> Start:
    """Poll `url` until it answers 200, `proc` exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return Start.EXITED
        if ask(url, key, timeout=2.0).ok:
            return Start.READY
        time.sleep(interval)
    return Start.TIMED_OUT


@dataclass(frozen=True)
class Answer:
    """What a URL answered: 200 or not, why not in a few words, and its JSON body."""

    ok: bool
    why_not: str = ""
    body: Any = None


def ask(url: str, key: SecretStr | None = None, timeout: float = 5.0) -> Answer:
    """GET `url` (with `key` as a bearer token), within `timeout` seconds."""
    return asyncio.run(_ask(url, key, timeout))


async def _ask(url: str, key: SecretStr | None, timeout: float) -> Answer:
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    upstream = Upstream(key, read_timeout=timeout, connect_timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            async with upstream.send(origin, "GET", target) as reply:
                raw = await reply.read()
    except TimeoutError:
        return Answer(False, f"no answer within {timeout:g}s")
    except APIError as exc:
        return Answer(False, _unreachable(exc))
    finally:
        await upstream.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if reply.status == 200:
        return Answer(True, body=body)
    try:
        return Answer(False, str(body["error"]["message"]), body)
    except (KeyError, TypeError):
        return Answer(False, f"status {reply.status}", body)


def _unreachable(exc: APIError) -> str:
    """Why a URL cannot be reached, as the system says it: "connection refused"."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return why(cause).lower()
    return exc.message
