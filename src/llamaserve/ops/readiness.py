"""Waiting for a process we started until its URL answers 200."""

from __future__ import annotations

import enum
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import httpx


class Start(enum.Enum):
    READY = "ready"
    EXITED = "exited"  # the process ended first
    TIMED_OUT = "timed out"


def wait_until_ready(
    url: str,
    proc: subprocess.Popen[Any],
    timeout: float,
    *,
    headers: dict[str, str] | None = None,
    interval: float = 0.1,
) -> Start:
    """Poll `url` until it answers 200, `proc` exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return Start.EXITED
        if ask(url, headers, timeout=2.0).ok:
            return Start.READY
        time.sleep(interval)
    return Start.TIMED_OUT


@dataclass(frozen=True)
class Answer:
    """What a URL answered: 200 or not, why not in a few words, and its JSON body."""

    ok: bool
    why_not: str = ""
    body: Any = None


def ask(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> Answer:
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return Answer(False, f"no answer within {timeout:g}s")
    except httpx.HTTPError as exc:
        return Answer(False, _unreachable(exc))
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200:
        return Answer(True, body=body)
    try:
        return Answer(False, str(body["error"]["message"]), body)
    except (KeyError, TypeError):
        return Answer(False, f"status {response.status_code}", body)


def _unreachable(exc: httpx.HTTPError) -> str:
    """Why a URL cannot be reached, as the system says it: "connection refused"."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(exc).lower() or type(exc).__name__
