"""The settings' files and keys (their documentation: tests/test_docs.py)."""

from __future__ import annotations

import re

import pytest

from llamaserve.config import Settings, is_placeholder, new_engine_key
from tests.conftest import ROOT


def test_every_template_key_is_a_setting() -> None:
    template = (ROOT / "runtime" / "config.env.template").read_text()
    keys = re.findall(r"^([A-Z_]+)=", template, re.M)
    assert keys and {k.lower() for k in keys} <= set(Settings.model_fields)


@pytest.mark.parametrize(
    ("key", "placeholder"),
    [("CHANGE_ME_PLEASE_0123456789", True), ("changeme-0123456789abcdef", True),
     ("<your engine key here>", True), ("INSERT_token_here_12345678", True),
     ("xxxxxxxxxxxxxxxxxxxxxxxx", True), ("todo-set-a-real-key-0123", True),
     # Random keys with the letters inside a word: these were refused as placeholders,
     # so that about one key in a thousand install.sh generated was refused at start.
     ("aB3xxxk9ZqW77yourQLm2todoPz8Rr5cHangeW", False),
     ("Kq9_mXXXv2-Lr8TODOp1zYourx-0a9Bc7dEf6", False)],
)  # fmt: skip
def test_placeholder_keys_are_told_from_random_ones(key: str, placeholder: bool) -> None:
    assert is_placeholder(key) is placeholder
    assert (Settings(llama_server_api_key=key).api_key_problem() is not None) is placeholder
    assert not is_placeholder(new_engine_key())
