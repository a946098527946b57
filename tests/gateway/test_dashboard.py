"""The dashboard without a browser (the browser's test is test_dashboard_browser.py): its
login and sessions, held in the database across gateways; its data endpoints refused
without a session, and to a user's key; the figures of the request log and the live
state of the engines and queues."""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from llamaserve.gateway import admin
from llamaserve.store import reports
from tests.gateway.harness import Site
from tests.gateway.helpers import assert_envelope
from tests.gateway.helpers import mock_request as chat

pytestmark = pytest.mark.anyio
ADMIN = "adm-" + "k" * 40
DATA = ("/dashboard/usage", "/dashboard/live")


@pytest.fixture
async def gateway(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with site.gateway(llama_admin_api_key=ADMIN) as client:
        yield client


async def log_in(client: httpx.AsyncClient, key: str = ADMIN, **headers: str) -> httpx.Response:
    return await client.post("/dashboard/login", data={"key": key}, headers=headers)


def session_of(response: httpx.Response) -> str:
    """The session cookie's `name=value`, from its Set-Cookie."""
    return response.headers["set-cookie"].split(";")[0]


async def test_login_sets_a_strict_http_only_cookie(gateway: httpx.AsyncClient) -> None:
    form = await gateway.get("/dashboard/login")
    assert form.status_code == 200 and form.headers["content-type"].startswith("text/html")
    assert re.search(r'<form method="post" action="/dashboard/login">', form.text)
    assert "script-src 'self'" in form.headers["content-security-policy"]

    answer = await log_in(gateway)
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard"
    attributes = [a.strip() for a in answer.headers["set-cookie"].split(";")]
    assert {"HttpOnly", "SameSite=Strict", "Path=/dashboard", "Max-Age=43200"} <= set(attributes)
    assert "Secure" not in attributes  # plain http: a Secure cookie would never come back
    assert ADMIN not in answer.headers["set-cookie"]

    page = await gateway.get("/dashboard", headers={"cookie": session_of(answer)})
    assert page.status_code == 200 and '<table id="users">' in page.text


async def test_the_cookie_is_secure_over_https(gateway: httpx.AsyncClient) -> None:
    answer = await log_in(gateway, **{"x-forwarded-proto": "https"})
    assert "Secure" in [a.strip() for a in answer.headers["set-cookie"].split(";")]


async def test_without_a_session_the_page_sends_to_the_login(gateway: httpx.AsyncClient) -> None:
    for cookie in (None, "llamaserve_dashboard=forged", "other=1"):
        answer = await gateway.get("/dashboard", headers={"cookie": cookie} if cookie else {})
        assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/login"


async def test_a_wrong_key_gets_the_form_again(
    gateway: httpx.AsyncClient, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[int, int]] = []
    constant_time = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return constant_time(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", compare)
    user_key = site.create_user("alice")
    near = ADMIN[:-1] + "x"  # all but its last character right
    answers = [await log_in(gateway, key) for key in (near, "x", "", user_key)]
    for answer in answers:
        assert answer.status_code == 401 and "set-cookie" not in answer.headers
        assert "That is not the admin key." in answer.text
    # The same answer whatever the key; each compared as a fixed-size digest in constant
    # time, so that how much of a guess is right does not show in the time it takes.
    assert len({a.text for a in answers}) == 1
    assert compared == [(32, 32)] * len(answers)


async def test_without_an_admin_key_nobody_logs_in(site: Site) -> None:
    async with site.gateway() as client:
        form = await client.get("/dashboard/login")
        assert "nobody can log in" in form.text
        for key in ("", "CHANGE_ME"):
            assert (await log_in(client, key)).status_code == 401


async def test_data_needs_a_session_or_the_admin_key(
    gateway: httpx.AsyncClient, site: Site
) -> None:
    user_key = site.create_user("alice")
    for path in DATA:
        error = assert_envelope(await gateway.get(path), 401, proxied=False)
        assert error["code"] == "login_required"
        bad = {"cookie": "llamaserve_dashboard=forged"}
        assert_envelope(await gateway.get(path, headers=bad), 401, proxied=False)
        as_user = {"authorization": f"Bearer {user_key}"}
        error = assert_envelope(await gateway.get(path, headers=as_user), 403, proxied=False)
        assert error["code"] == "admin_key_required"
        wrong = {"authorization": "Bearer " + ADMIN[::-1]}
        assert_envelope(await gateway.get(path, headers=wrong), 401, proxied=False)
        as_admin = {"authorization": f"Bearer {ADMIN}"}
        assert (await gateway.get(path, headers=as_admin)).status_code == 200


async def test_other_paths_and_methods(gateway: httpx.AsyncClient) -> None:
    assert_envelope(await gateway.get("/dashboard/nothing"), 404, proxied=False)
    answer = await gateway.post("/dashboard")
    assert assert_envelope(answer, 405, proxied=False) and answer.headers["allow"] == "GET"
    assert_envelope(await gateway.get("/dashboard/logout"), 405, proxied=False)
    assert (await gateway.get("/dashboardx")).status_code == 404  # the API's, not ours
    script = await gateway.get("/dashboard/dashboard.js")
    assert script.status_code == 200 and "/dashboard/live" in script.text


async def test_sessions_hold_across_gateways_and_logout_ends_them(site: Site) -> None:
    async with (
        site.gateway(llama_admin_api_key=ADMIN) as first,
        site.gateway(llama_admin_api_key=ADMIN) as second,
    ):
        cookie = {"cookie": session_of(await log_in(first))}
        assert (await second.get("/dashboard", headers=cookie)).status_code == 200
        assert (await second.get("/dashboard/live", headers=cookie)).status_code == 200
        out = await second.post("/dashboard/logout", headers=cookie)
        assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
        assert "Max-Age=0" in out.headers["set-cookie"]
        for gateway in (first, second):
            assert (await gateway.get("/dashboard", headers=cookie)).status_code == 303
            assert (await gateway.get("/dashboard/usage", headers=cookie)).status_code == 401
    assert await site.fetch("SELECT token_hash FROM llama_dashboard_sessions") == []


async def test_usage_is_the_request_log(gateway: httpx.AsyncClient, site: Site) -> None:
    keys = {name: site.create_user(name) for name in ("alice", "bob")}
    for i, name in enumerate(["alice", "alice", "bob", "alice"]):
        headers = {"authorization": f"Bearer {keys[name]}"}
        answer = await gateway.post("/v1/chat/completions", json=chat(f"q{i}"), headers=headers)
        await site.logged(answer.headers["x-request-id"])
    await gateway.post("/v1/chat/completions", json=chat("x"), headers={"authorization": "no"})
    admin_key = {"authorization": f"Bearer {ADMIN}"}
    for _ in range(50):  # the unauthenticated one is written in the next batch
        figures = (await gateway.get("/dashboard/usage", headers=admin_key)).json()
        if sum(t["requests"] for t in figures["day"]) == 5:
            break
        await asyncio.sleep(0.1)
    conn = await site.connect()
    try:
        for window, since in (("day", timedelta(hours=24)), ("week", timedelta(days=7))):
            expected = [
                {"username": u.username, "requests": u.requests, "errors": u.errors,
                 "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}
                for u in await reports.usage(conn, since=since)
            ]  # fmt: skip
            got = [{k: t[k] for k in expected[0]} for t in figures[window]]
            assert got == expected
    finally:
        await conn.close()
    assert [t["username"] for t in figures["day"]] == ["alice", "bob", None]
    assert sum(p["requests"] for p in figures["hourly"]) == 5
    assert sum(h["requests"] for h in figures["latency"]) == 4


async def test_live_shows_a_slot_busy_while_a_request_generates(
    gateway: httpx.AsyncClient, site: Site
) -> None:
    key = site.create_user("alice")
    admin_key = {"authorization": f"Bearer {ADMIN}"}
    idle = (await gateway.get("/dashboard/live", headers=admin_key)).json()
    assert [e["busy"] for e in idle["engines"]] == [0] and idle["users"] == []
    assert idle["engines"][0]["slots"] == 4 and idle["engines"][0]["healthy"]

    slow = asyncio.create_task(gateway.post(
        "/v1/chat/completions", json=chat("slow", delay=2.0),
        headers={"authorization": f"Bearer {key}"},
    ))  # fmt: skip
    for _ in range(100):
        live = (await gateway.get("/dashboard/live", headers=admin_key)).json()
        if live["users"]:
            break
        await asyncio.sleep(0.02)
    assert live["engines"][0]["busy"] == 1
    assert live["users"] == [{"username": "alice", "waiting": 0, "generating": 1}]
    assert (await slow).status_code == 200
    after = (await gateway.get("/dashboard/live", headers=admin_key)).json()
    assert [e["busy"] for e in after["engines"]] == [0] and after["users"] == []
