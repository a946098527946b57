"""Progress lines on stderr while a run goes on, with the seconds since it began."""

from __future__ import annotations

import sys
import time

_BEGAN = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _BEGAN:6.0f}s] {message}", file=sys.stderr, flush=True)
