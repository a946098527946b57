"""The docs: the settings reference is generated from the settings' declarations and
current, every setting says what it does, and every relative link leads to a page and
heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamaserve.config import REGENERATE, Settings, settings_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#:\s]*)(?:#([^)\s]*))?\)")


def test_configuration_page_is_current() -> None:
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == settings_reference(ROOT), (
        f"docs/configuration.md is stale (a setting or a template changed): run `{REGENERATE}`"
    )


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_description(name: str) -> None:
    description = Settings.model_fields[name].description or ""
    assert description.strip(), f"{name.upper()} has no description= in Settings (config.py)"


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda page: page.name)
def test_relative_links_lead_somewhere(page: Path) -> None:
    for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
        linked = (page.parent / target) if target else page
        assert linked.is_file(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), (
                f"{page.name} links to {target}#{anchor}: no such heading"
            )


def test_the_readme_maps_every_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES:
        assert f"](docs/{page.name})" in readme, f"README.md does not list docs/{page.name}"


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
