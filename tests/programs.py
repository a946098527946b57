"""Programs some tests need from the system (a real Prometheus, a real browser): a
missing one fails the test under CI, which installs them (.ci/run), and skips it
elsewhere with the command that installs it."""

from __future__ import annotations

import os
import shutil

import pytest


def need_program(name: str, package: str | None = None) -> str:
    """The path of `name`; else a failure under CI, a skip elsewhere."""
    path = shutil.which(name)
    if path is not None:
        return path
    why = f"{name} is not installed: apt-get install {package or name}"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)
