"""What the gateway's log says of its database: one line when it stops answering, one a
minute while it stays away, one when it is back; a refused statement each time."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from llamaserve.gateway import db_status
from llamaserve.gateway.db_status import REMIND_EVERY, DatabaseStatus


def test_an_outage_is_three_kinds_of_line_not_one_per_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(db_status.time, "monotonic", lambda: now[0])
    status = DatabaseStatus()
    caplog.set_level(logging.WARNING, logger="llamaserve.gateway")

    def said() -> list[str]:
        lines = [record.getMessage() for record in caplog.records]
        caplog.clear()
        return lines

    gone = ConnectionRefusedError(111, "Connection refused")
    status.failed(gone)
    [first] = said()
    assert "Connection refused" in first and "until it answers" in first
    for _ in range(100):  # requests refused meanwhile, and the pool's retries
        now[0] += REMIND_EVERY / 200
        status.failed(gone)
    assert said() == []
    now[0] += REMIND_EVERY / 2 + 1
    status.failed(gone)
    assert said() == [
        "database: still not answering after 61 s: ConnectionRefusedError: "
        "[Errno 111] Connection refused"
    ]
    now[0] += 4.5
    status.answered()
    status.answered()
    assert said() == ["database: answering again after 65.5 s"]

    # A statement the database refuses is not an outage: each is logged, none is
    # followed by an "answering again".
    for _ in range(2):
        status.failed(asyncpg.UniqueViolationError("duplicate key"))
    status.answered()
    assert said() == ["database: a statement failed: UniqueViolationError: duplicate key"] * 2
