"""Every setting is documented in the README's configuration table, with its default."""

from __future__ import annotations

import re

from llamaserve.config import Settings
from tests.conftest import ROOT


def readme_table() -> dict[str, str]:
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", (ROOT / "README.md").read_text(), re.M)
    return {name: default.strip() for name, default in rows}


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    table = readme_table()
    for name, field in Settings.model_fields.items():
        assert name.upper() in table, f"{name.upper()} is not documented in README.md"
        shown = field.default
        if hasattr(shown, "get_secret_value"):
            shown = shown.get_secret_value()
        if isinstance(shown, bool):
            shown = "1" if shown else "0"
        assert table[name.upper()].strip("`") == str(shown) or shown == "", name


def test_every_template_key_is_a_setting() -> None:
    template = (ROOT / "runtime" / "config.env.template").read_text()
    keys = re.findall(r"^([A-Z_]+)=", template, re.M)
    assert keys and {k.lower() for k in keys} <= set(Settings.model_fields)
