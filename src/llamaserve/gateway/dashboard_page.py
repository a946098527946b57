"""The dashboard's HTML: the login form, and the page with its charts drawn as SVG on the
server (no charting library, nothing fetched from elsewhere: an operator's machine may
have no internet).

Every figure shown is also in the page as data: the per-user table's cells carry
`data-field` and `data-value`, each chart `data-chart` and its bars or points
`data-value`, so that a test (or a script) reads them without parsing text.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from llamaserve.store import dashboard
from llamaserve.store.dashboard import Point, Totals
from llamaserve.store.quotas import QuotaUsage

NAMED = 8  # users charted by name (colours s0..s7); the others as one series
ANONYMOUS = "(no valid key)"
WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 8, 24  # the plot's margins

Series = tuple[str, str, Sequence[float | None]]  # label, CSS class, a value per slot


@dataclass(frozen=True)
class Figures:
    """What the page shows of the request log and the quotas, as of `now` (the
    database's clock)."""

    now: datetime
    day: list[dashboard.Totals]
    week: list[dashboard.Totals]
    hourly: list[dashboard.Point]
    daily: list[dashboard.Point]
    latency: list[dashboard.Latency]
    quotas: dict[str, QuotaUsage]


def login(*, enabled: bool, refused: bool = False) -> str:
    """The login form; `refused`: after a wrong key."""
    notes = []
    if not enabled:
        notes.append("LLAMA_ADMIN_API_KEY is not set (or too weak): nobody can log in.")
    if refused:
        notes.append("That is not the admin key.")
    errors = "".join(f'<p class="error" role="alert">{escape(n)}</p>' for n in notes)
    form = f"""<main class="login"><h1>Llamaserve dashboard</h1>{errors}
<form method="post" action="/dashboard/login">
<label for="key">Admin key (<code>LLAMA_ADMIN_API_KEY</code>)</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Log in</button></form></main>"""
    return _document("Log in", form, script=False)


def page(figures: Figures) -> str:
    """The dashboard as of `figures.now`."""
    now = figures.now
    header = f"""<header><h1>Llamaserve</h1>
<span class="muted">request log as of {now:%Y-%m-%d %H:%M} UTC; read-only</span>
<form method="post" action="/dashboard/logout"><button type="submit">Log out</button></form>
</header>"""
    body = header + "<main>" + _live() + _users(figures) + _charts(figures) + "</main>"
    return _document("Dashboard", body, script=True)


def _document(title: str, body: str, *, script: bool) -> str:
    js = '<script src="/dashboard/dashboard.js" defer></script>' if script else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · Llamaserve</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/dashboard/dashboard.css">{js}</head>
<body>{body}</body></html>
"""


def _live() -> str:
    """The live panel: filled and refreshed by dashboard.js from /dashboard/live."""
    return """<section id="live" class="panel" data-busy="" data-waiting="">
<h2>Live <span id="live-updated" class="muted">waiting for the first update</span></h2>
<div class="columns">
<table><thead><tr><th>Engine</th><th>State</th><th>Slots busy</th></tr></thead>
<tbody id="live-engines"></tbody></table>
<table><thead><tr><th>User</th><th class="num">Generating</th><th class="num">Waiting</th></tr>
</thead><tbody id="live-users"><tr><td colspan="3" class="muted">idle</td></tr></tbody></table>
</div></section>"""


# The per-user table

_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "errors", "refusals")
_HEADINGS = ("requests", "prompt tokens", "completion tokens", "errors", "of which refused")


def _users(figures: Figures) -> str:
    day = {t.username: t for t in figures.day}
    head = "".join(f'<th class="num">{h}</th>' for h in _HEADINGS)
    rows = [_user_row(t, day.get(t.username), figures.quotas) for t in figures.week]
    if not rows:
        rows = ['<tr><td colspan="13" class="muted">no requests in the last 7 days</td></tr>']
    return f"""<section class="panel"><h2>Per user</h2>
<table id="users"><thead>
<tr><th></th><th colspan="5" class="group">last 24 hours</th>
<th colspan="5" class="group">last 7 days</th>
<th colspan="2" class="group">quota, this period</th></tr>
<tr><th>User</th>{head}{head}<th>used / quota</th><th class="num">left</th></tr>
</thead><tbody>{"".join(rows)}</tbody></table></section>"""


def _user_row(week: Totals, day: Totals | None, quotas: dict[str, QuotaUsage]) -> str:
    cells = []
    for window, totals in (("day", day), ("week", week)):
        for column in _COLUMNS:
            value = getattr(totals, column) if totals is not None else 0
            cells.append(_number(f"{window}-{column}", value))
    quota = quotas.get(week.username) if week.username else None
    cells.append(_quota(quota))
    name = escape(week.username or ANONYMOUS)
    return f'<tr data-user="{escape(week.username or "")}"><th>{name}</th>{"".join(cells)}</tr>'


def _number(field: str, value: int) -> str:
    return f'<td class="num" data-field="{field}" data-value="{value}">{value:,}</td>'


def _quota(quota: QuotaUsage | None) -> str:
    if quota is None:
        return '<td class="muted">none</td><td></td>'
    used = quota.used + quota.reserved
    share = min(1.0, used / quota.tokens) if quota.tokens else 1.0
    bar = (
        f'<svg class="meter" viewBox="0 0 100 8" width="100" height="8" aria-hidden="true">'
        f'<rect class="meter-back" width="100" height="8"/>'
        f'<rect class="{"meter-full" if share >= 0.9 else "meter-used"}" width="{share * 100:.1f}"'
        f' height="8"/></svg>'
    )
    return (
        f'<td data-field="quota-used" data-value="{quota.used}">{bar} {quota.used:,} / '
        f"{quota.tokens:,}</td>{_number('quota-left', quota.left)}"
    )


# The charts


def _charts(figures: Figures) -> str:
    now = figures.now
    hours = _slots(_floor(now - timedelta(hours=24), "hour"), timedelta(hours=1), 25)
    days = _slots(_floor(now - timedelta(days=7), "day"), timedelta(days=1), 8)
    names = _named([t.username for t in figures.week])
    tokens: Callable[[Point], int] = lambda p: p.prompt_tokens + p.completion_tokens  # noqa: E731
    requests: Callable[[Point], int] = lambda p: p.requests  # noqa: E731
    hour_label, day_label = (lambda t: f"{t:%H}h"), (lambda t: f"{t:%a %d}")
    latency = {p.at: p for p in figures.latency}
    charts = [
        stacked_bars("tokens-24h", "Tokens per hour, last 24 hours", hours, hour_label,
                     _by_user(figures.hourly, hours, names, tokens)),
        stacked_bars("requests-24h", "Requests per hour, last 24 hours", hours, hour_label,
                     _by_user(figures.hourly, hours, names, requests)),
        stacked_bars("tokens-7d", "Tokens per day, last 7 days", days, day_label,
                     _by_user(figures.daily, days, names, tokens)),
        stacked_bars("requests-7d", "Requests per day, last 7 days", days, day_label,
                     _by_user(figures.daily, days, names, requests)),
        stacked_bars("errors-24h", "Errors and refusals per hour, last 24 hours", hours,
                     hour_label, _failures(figures.hourly, hours)),
        lines("latency-24h", "Latency of successful requests per hour (ms)", hours, hour_label, [
            ("p50", "s0", [latency[t].p50_ms if t in latency else None for t in hours]),
            ("p95", "s1", [latency[t].p95_ms if t in latency else None for t in hours]),
        ]),
    ]  # fmt: skip
    return '<section class="charts">' + "".join(charts) + "</section>"


def _floor(at: datetime, step: str) -> datetime:
    at = at.replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if step == "day" else at


def _slots(first: datetime, step: timedelta, count: int) -> list[datetime]:
    return [first + i * step for i in range(count)]


def _named(usernames: Sequence[str | None]) -> dict[str | None, int]:
    """The busiest users' colours, by username (the busiest first, as `totals` orders)."""
    return {name: i for i, name in enumerate(usernames[:NAMED])}


def _by_user(
    points: list[Point],
    slots: list[datetime],
    names: dict[str | None, int],
    value: Callable[[Point], int],
) -> list[Series]:
    index = {at: i for i, at in enumerate(slots)}
    sums: dict[str | None, list[float | None]] = defaultdict(lambda: [0] * len(slots))
    others: list[float | None] = [0] * len(slots)
    for point in points:
        if point.at in index:
            into = sums[point.username] if point.username in names else others
            into[index[point.at]] = (into[index[point.at]] or 0) + value(point)
    series: list[Series] = [(name or ANONYMOUS, f"s{i}", sums[name]) for name, i in names.items()]
    if any(others):
        series.append(("others", "s-other", others))
    return series


def _failures(points: list[Point], slots: list[datetime]) -> list[Series]:
    index = {at: i for i, at in enumerate(slots)}
    errors: list[float | None] = [0] * len(slots)
    refusals: list[float | None] = [0] * len(slots)
    for point in points:
        if point.at in index:
            i = index[point.at]
            errors[i] = (errors[i] or 0) + point.errors - point.refusals
            refusals[i] = (refusals[i] or 0) + point.refusals
    return [("errors", "s-error", errors), ("refusals (429)", "s-refusal", refusals)]


def stacked_bars(
    name: str, title: str, slots: list[datetime], label: Callable[[datetime], str],
    series: list[Series],
) -> str:  # fmt: skip
    """A bar per slot, the series stacked in it; each bar's `data-value` its value."""
    totals = [sum(s[2][i] or 0 for s in series) for i in range(len(slots))]
    top = _ceiling(max(totals, default=0))
    step = (WIDTH - LEFT - RIGHT) / len(slots)
    shapes = []
    for i, at in enumerate(slots):
        base = 0.0
        for text, css, values in series:
            value = values[i] or 0
            if value:
                y0, y1 = _y(base, top), _y(base + value, top)
                shapes.append(
                    f'<rect class="bar {css}" data-series="{escape(text)}" data-value="{value:g}" '
                    f'x="{LEFT + i * step + 1:.1f}" y="{y1:.1f}" width="{step - 2:.1f}" '
                    f'height="{y0 - y1:.1f}"><title>{escape(text)}, {label(at)}: {value:,g}'
                    "</title></rect>"
                )
                base += value
    return _chart(name, title, top, slots, label, shapes, series)


def lines(
    name: str, title: str, slots: list[datetime], label: Callable[[datetime], str],
    series: list[Series],
) -> str:  # fmt: skip
    """A line per series through the slots that have a value, a dot on each."""
    top = _ceiling(max((v or 0 for s in series for v in s[2]), default=0))
    step = (WIDTH - LEFT - RIGHT) / len(slots)
    shapes = []
    for text, css, values in series:
        points = [(LEFT + (i + 0.5) * step, _y(v, top), v) for i, v in enumerate(values) if v]
        if points:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
            shapes.append(f'<polyline class="line {css}" points="{path}"/>')
        shapes += [
            f'<circle class="dot {css}" data-series="{text}" data-value="{v:.1f}" cx="{x:.1f}" '
            f'cy="{y:.1f}" r="2.5"><title>{text}: {v:,.0f} ms</title></circle>'
            for x, y, v in points
        ]
    return _chart(name, title, top, slots, label, shapes, series)


def _chart(
    name: str, title: str, top: float, slots: list[datetime], label: Callable[[datetime], str],
    shapes: list[str], series: list[Series],
) -> str:  # fmt: skip
    step = (WIDTH - LEFT - RIGHT) / len(slots)
    grid = []
    for fraction in (0.0, 0.5, 1.0):
        y = _y(top * fraction, top)
        grid.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_short(top * fraction)}</text>"
        )
    every = max(1, len(slots) // 8)
    ticks = [
        f'<text class="axis" x="{LEFT + (i + 0.5) * step:.1f}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{label(at)}</text>'
        for i, at in enumerate(slots)
        if (len(slots) - 1 - i) % every == 0
    ]
    empty = "" if shapes else (
        f'<text class="axis" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data</text>'
    )  # fmt: skip
    legend = "".join(
        f'<li><svg width="10" height="10" aria-hidden="true"><rect class="{css}" width="10" '
        f'height="10"/></svg>{escape(text)}</li>'
        for text, css, _ in series
    )
    return f"""<figure class="panel chart"><figcaption>{escape(title)}</figcaption>
<svg data-chart="{name}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">
{"".join(grid)}{"".join(shapes)}{"".join(ticks)}{empty}</svg>
<ul class="legend">{legend}</ul></figure>"""


def _y(value: float, top: float) -> float:
    return HEIGHT - BOTTOM - (HEIGHT - BOTTOM - TOP) * (value / top)


def _ceiling(value: float) -> float:
    """A round number (1, 2 or 5 times a power of ten) at least `value`; 1 for nothing."""
    if value <= 0:
        return 1.0
    power = 1.0
    while power * 10 <= value:
        power *= 10
    while power > value:
        power /= 10
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def _short(value: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"
