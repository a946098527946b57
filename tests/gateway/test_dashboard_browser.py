"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright,
against a gateway process whose request log holds the requests of two users made
through it. The operator logs in through the form; the charts are drawn with the data;
the page's figures are the user CLI's `usage --json`; the live panel follows a slow
stream; logging out ends the session. Nothing goes to the browser's console, and the
admin key is in no URL. The page is left in test-artifacts/dashboard.png for a person to
look at."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.gateway.harness import Site
from tests.gateway.helpers import extra_gateway
from tests.gateway.helpers import mock_request as chat
from tests.programs import need_program

playwright = pytest.importorskip("playwright.sync_api")

ADMIN = "adm-" + "b" * 40
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"
# A browser that reaches nothing but the gateway: without the flags against background
# networking, Chromium tries Google's services and a closed network refuses it.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
CHARTS = ("tokens-24h", "requests-24h", "tokens-7d", "requests-7d", "errors-24h", "latency-24h")
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors")


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium. Playwright's sync API runs an event loop of its own while
    it is open: what uses asyncio.run (the database's queries) comes before."""
    path = need_program("chromium")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def make_requests(site: Site, url: str) -> int:
    """Requests of alice and bob through the gateway, some failed or refused, and one
    without a key; the number of rows they make."""
    alice, bob = site.create_user("alice"), site.create_user("bob")
    result = site.cli("set-quota", "--username", "alice", "--tokens", "5000", "--per", "day")
    assert result.returncode == 0, result.stderr
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(6):
            client.post("/v1/chat/completions", json=chat(f"a{i}", stream=i % 2 == 0),
                        headers={"authorization": f"Bearer {alice}"})  # fmt: skip
        for i in range(3):
            client.post("/v1/chat/completions", json=chat(f"b{i}"),
                        headers={"authorization": f"Bearer {bob}"})  # fmt: skip
        bad = client.post("/v1/chat/completions", json={"model": "m"},
                          headers={"authorization": f"Bearer {bob}"})  # fmt: skip
        assert bad.status_code == 400
        assert client.post("/v1/chat/completions", json=chat("x")).status_code == 401
    return 6 + 3 + 1 + 1


def wait_for_rows(site: Site, count: int) -> None:
    for _ in range(100):
        if site.query("SELECT count(*) FROM llama_requests")[0][0] >= count:
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"fewer than {count} rows in the request log")


def usage(site: Site, since: str) -> list[dict[str, Any]]:
    result = site.cli("usage", "--json", "--since", since)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def slow_streams(url: str, key: str, count: int) -> list[threading.Thread]:
    """`count` streams of the user at once, each generating for 4 s."""

    def stream(i: int) -> None:
        body = chat(f"slow{i}", delay=4.0, stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {key}"}) as answer:  # fmt: skip
            assert answer.status_code == 200
            answer.read()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_the_dashboard_in_a_browser(site: Site) -> None:
    # One request of a user generating at a time: a second one waits in their queue.
    with extra_gateway(site, LLAMA_ADMIN_API_KEY=ADMIN, LLAMA_PROXY_USER_CONCURRENCY="1") as url:
        wait_for_rows(site, make_requests(site, url))
        day, week = usage(site, "24h"), usage(site, "7d")
        assert {r["username"] for r in week} == {"alice", "bob", None}
        carol = site.create_user("carol")
        with chromium() as browser:
            problems, visited = look(browser, url, day, week, carol)
    assert problems == []
    assert visited and not [u for u in visited if ADMIN in u]


def look(
    browser: Any, url: str, day: list[dict[str, Any]], week: list[dict[str, Any]], carol: str
) -> tuple[list[str], list[str]]:
    """The operator's visit: what went to the console, and the URLs visited."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    visited: list[str] = []
    page.on("request", lambda request: visited.append(request.url))

    page.goto(f"{url}/dashboard")
    assert page.url == f"{url}/dashboard/login"
    page.fill("#key", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/dashboard")

    [cookie] = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard" and ADMIN not in cookie["value"]

    check_charts(page, week)
    check_table(page, day, week)
    check_live_panel(page, url, carol)

    page.click("text=Log out")
    page.wait_for_url(f"{url}/dashboard/login")
    old = httpx.get(f"{url}/dashboard", headers={"cookie": f"{cookie['name']}={cookie['value']}"})
    assert old.status_code == 303 and old.headers["location"] == "/dashboard/login"
    page.goto(f"{url}/dashboard")
    assert page.url == f"{url}/dashboard/login"
    context.close()
    return problems, visited


def check_charts(page: Any, week: list[dict[str, Any]]) -> None:
    for name in CHARTS:
        assert page.locator(f'svg[data-chart="{name}"]').count() == 1, name
    for name in ("tokens-24h", "requests-24h", "tokens-7d", "requests-7d", "errors-24h"):
        assert page.locator(f'svg[data-chart="{name}"] rect.bar').count() > 0, name
    assert page.locator('svg[data-chart="latency-24h"] circle.dot').count() >= 2  # p50, p95
    drawn = page.eval_on_selector_all(
        'svg[data-chart="tokens-7d"] rect.bar', "bars => bars.map(b => Number(b.dataset.value))"
    )
    assert sum(drawn) == sum(r["prompt_tokens"] + r["completion_tokens"] for r in week)
    requests = page.eval_on_selector_all(
        'svg[data-chart="requests-24h"] rect.bar', "bars => bars.map(b => Number(b.dataset.value))"
    )
    assert sum(requests) == sum(r["requests"] for r in week)


def check_table(page: Any, day: list[dict[str, Any]], week: list[dict[str, Any]]) -> None:
    """Each user's figures in the table are the CLI's, as data and as the text shown."""
    for window, rows in (("day", day), ("week", week)):
        for row in rows:
            user = page.locator(f'#users tr[data-user="{row["username"] or ""}"]')
            for field in FIELDS:
                cell = user.locator(f'td[data-field="{window}-{field}"]')
                assert int(cell.get_attribute("data-value")) == row[field], (row, field)
                assert cell.inner_text().replace(",", "") == str(row[field])
    [alice] = [r for r in day if r["username"] == "alice"]
    used = page.locator('#users tr[data-user="alice"] td[data-field="quota-used"]')
    assert int(used.get_attribute("data-value")) == alice["quota"]["used"] > 0
    left = page.locator('#users tr[data-user="alice"] td[data-field="quota-left"]')
    assert int(left.get_attribute("data-value")) == alice["quota"]["left"]


def check_live_panel(page: Any, url: str, key: str) -> None:
    """Idle, then a slot busy and the user's queue while two slow streams run, then idle."""
    page.wait_for_selector('#live[data-busy="0"]')
    threads = slow_streams(url, key, 2)
    carol = '#live-users tr[data-user="carol"]'
    page.wait_for_selector(f'#live[data-busy="1"] {carol} td[data-field="generating"]:text("1")')
    page.wait_for_selector(f'{carol} td[data-field="waiting"]:text("1")')
    assert page.locator("#live-engines tr span.slot.busy").count() == 1
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    for thread in threads:
        thread.join(timeout=30)
    page.wait_for_selector('#live[data-busy="0"]', timeout=10000)
    page.wait_for_selector(f"{carol}", state="detached")
    assert page.locator("#live-users").inner_text().strip() == "idle"
