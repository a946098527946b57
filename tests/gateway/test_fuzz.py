"""A short fuzzing with OpenAI's own OpenAPI description (bench/fuzz.py, schemathesis) of
the gateway and of the engine behind it, with the real model, the Responses API's
routes among the rest: no request of it gets a 5xx, nor an error outside OpenAI's
envelope. The full run, with its report, is `python -m bench.fuzz`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench import fuzz

from tests.gateway.conftest import Stack

SMOKE = ["--max-examples", "5", "--max-time", "20"]  # seconds, once the description is read
pytestmark = pytest.mark.skipif(not fuzz.SPEC.is_file(), reason=f"no description at {fuzz.SPEC}")


def smoke(url: str, key: str, out: Path) -> dict[str, Any]:
    args = fuzz.parse_args([*SMOKE, "--out", str(out)])
    fuzz.fuzz(args, url, key, out)
    figures: dict[str, Any] = json.loads((out / "figures.json").read_text())
    return figures


# schemathesis leaves the report files it checked open (see fuzz.run_schemathesis).
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <_io.FileIO name='[^']*/(report.json|requests.har|junit.xml)'"
    ":pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.parametrize("target", ["gateway", "engine"])
def test_no_request_of_the_description_gets_a_server_error(
    stack: Stack, alice: str, target: str, tmp_path: Path
) -> None:
    if target == "gateway":
        figures = smoke(stack.gateway_url, alice, tmp_path)
    else:
        figures = smoke(stack.engine_url, stack.engine_key, tmp_path)
    assert figures["requests"] >= 100, figures
    assert figures["server_errors"] == 0, figures["server_error_kinds"]
    envelopes = [found for found in figures["failures"] if "error_envelope" in found["title"]]
    assert not envelopes, figures["reproducers"]
