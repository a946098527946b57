"""The docs: the settings reference is generated from the settings' declarations and
current, and every setting says what it does."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaserve.config import REGENERATE, Settings, settings_reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_page_is_current() -> None:
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == settings_reference(ROOT), (
        f"docs/configuration.md is stale (a setting or a template changed): run `{REGENERATE}`"
    )


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_description(name: str) -> None:
    description = Settings.model_fields[name].description or ""
    assert description.strip(), f"{name.upper()} has no description= in Settings (config.py)"
