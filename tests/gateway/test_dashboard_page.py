"""The dashboard's HTML and SVG, from figures made up here: more users than colours, the
bars' values, the table's data, text escaped."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from llamaserve.gateway import dashboard_page
from llamaserve.gateway.dashboard_page import NAMED, Figures
from llamaserve.store.dashboard import Latency, Point, Totals

NOW = datetime(2026, 12, 3, 12, 30, tzinfo=UTC)
HOUR = NOW.replace(minute=0)


def figures(users: int) -> Figures:
    names = [f"user{i:02d}" for i in range(users)]
    week = [Totals(n, 100 - i, i, 0, 10 * (i + 1), i + 1) for i, n in enumerate(names)]
    hourly = [Point(HOUR - timedelta(hours=h), n, 1, 0, 0, 10 * (i + 1), i + 1)
              for i, n in enumerate(names) for h in range(3)]  # fmt: skip
    daily = [Point(HOUR.replace(hour=0), n, 3, 0, 0, 30 * (i + 1), 3 * (i + 1))
             for i, n in enumerate(names)]  # fmt: skip
    latency = [Latency(HOUR, 3 * users, 100.0, 900.0)]
    return Figures(NOW, week, week, hourly, daily, latency, {})


def values(html: str, chart: str, series: str | None = None) -> list[float]:
    svg = re.search(rf'<svg data-chart="{chart}".*?</svg>', html, re.S)
    assert svg is not None, chart
    pattern = r'data-series="([^"]*)" data-value="([^"]*)"'
    return [float(v) for s, v in re.findall(pattern, svg.group(0)) if series in (None, s)]


def test_the_busiest_users_by_name_the_others_together() -> None:
    html = dashboard_page.page(figures(NAMED + 3))
    tokens = sum(11 * (i + 1) for i in range(NAMED + 3))  # each user's per hour
    assert sum(values(html, "tokens-24h")) == 3 * tokens
    assert sum(values(html, "tokens-7d")) == 3 * tokens
    others = sum(11 * (i + 1) for i in range(NAMED, NAMED + 3))
    assert values(html, "tokens-24h", "others") == [others] * 3
    assert values(html, "tokens-24h", "user00") == [11] * 3
    assert not values(html, "tokens-24h", f"user{NAMED:02d}")  # among the others
    assert values(html, "latency-24h", "p95") == [900.0]


def test_the_table_holds_every_user_with_data() -> None:
    html = dashboard_page.page(figures(NAMED + 3))
    rows = re.findall(r'<tr data-user="(user\d+)">', html)
    assert rows == [f"user{i:02d}" for i in range(NAMED + 3)]
    assert 'data-field="week-prompt_tokens" data-value="110">110</td>' in html
    assert '<td class="muted">none</td>' in html  # no quota


def test_an_empty_log_and_the_anonymous_row() -> None:
    html = dashboard_page.page(Figures(NOW, [], [], [], [], [], {}))
    assert "no requests in the last 7 days" in html and html.count(">no data</text>") == 6
    anonymous = Totals(None, 2, 2, 0, 0, 0)
    html = dashboard_page.page(Figures(NOW, [anonymous], [anonymous], [], [], [], {}))
    assert '<tr data-user=""><th>(no valid key)</th>' in html


def test_the_login_form() -> None:
    form = dashboard_page.login(enabled=True, refused=True)
    assert 'method="post"' in form and 'type="password"' in form
    assert "That is not the admin key." in form and "nobody can log in" not in form
    assert "<script" not in form
