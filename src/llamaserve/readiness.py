"""Waiting for a process we started until its URL answers 200."""

from __future__ import annotations

import enum
import subprocess
import time
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
        if answers(url, headers):
            return Start.READY
        time.sleep(interval)
    return Start.TIMED_OUT


def answers(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def why_not_ready(url: str, headers: dict[str, str] | None = None) -> str:
    """What `url` answers now instead of 200, in a few words (its error's message)."""
    try:
        response = httpx.get(url, headers=headers, timeout=5.0)
    except httpx.HTTPError:
        return "not answering yet"
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code}"
