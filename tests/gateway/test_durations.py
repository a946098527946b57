"""The rate-limit reset header's durations, in OpenAI's style."""

from __future__ import annotations

import pytest

from llamaserve.gateway.admission import format_duration


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0004, "0ms"), (0.02, "20ms"), (0.9996, "1s"), (1, "1s"), (1.5, "1.5s"),
     (59.94, "59.9s"), (59.96, "1m0s"), (60, "1m0s"), (119.99, "2m0s"), (360, "6m0s")],
)  # fmt: skip
def test_durations_round_before_they_are_split(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown
