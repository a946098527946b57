"""Every log line is one line (`llamaserve.logs`): control characters escaped as Python
writes them, a traceback after it kept as it is."""

from __future__ import annotations

import logging
import sys

from llamaserve.logs import OneLineFormatter, escape


def test_what_could_break_or_garble_a_line_is_escaped() -> None:
    said = "a\r\nb\x00\t\x1b[2J\x7f\x85\x9f\u2028\u2029\ud800"
    assert escape(said) == "a\\r\\nb\\x00\\t\\x1b[2J\\x7f\\x85\\x9f\\u2028\\u2029\\ud800"
    assert escape("/v1/models/é ü 中 \\n") == "/v1/models/é ü 中 \\n"  # as it was


def test_a_record_is_one_line_and_its_traceback_follows() -> None:
    try:
        raise ValueError("x")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "llamaserve.gateway", logging.ERROR, __file__, 1, "request %s failed", ("a\nb",), exc_info
    )
    first, *traceback = OneLineFormatter("%(name)s %(message)s").format(record).splitlines()
    assert first == "llamaserve.gateway request a\\nb failed"
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "ValueError: x"
