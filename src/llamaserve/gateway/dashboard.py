"""The operator's dashboard at `/dashboard`: a read-only page of who uses what, and its
login.

The operator logs in with `LLAMA_ADMIN_API_KEY` in a form (never in a URL) and gets a
session cookie (`HttpOnly`, `SameSite=Strict`, `Path=/dashboard`; `Secure` when the
request came over https). The cookie holds a random token; the database holds its
SHA-256 with an expiry (`store.dashboard`), so that every gateway on it knows the
session and logging out ends it everywhere. The page is rendered by `dashboard_page`
from the request log's rollups and the quotas; its live panel polls `/dashboard/live`,
this gateway's engines and queues. `/dashboard/usage` and `/dashboard/live` answer JSON,
to a session or to the admin key as a bearer token; without either, 401 in OpenAI's
envelope, as every error of the gateway.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from llamaserve.errors import APIError, AuthenticationFailed, NotFound
from llamaserve.gateway import dashboard_page
from llamaserve.gateway.admin import Operator
from llamaserve.gateway.dashboard_page import Figures
from llamaserve.gateway.db_status import database_errors
from llamaserve.gateway.scheduling import Scheduler
from llamaserve.http.answer import Answer, send_error
from llamaserve.http.asgi import header, read_body
from llamaserve.routes import check_method
from llamaserve.store import dashboard, quotas

log = logging.getLogger("llamaserve.gateway")

PREFIX = "/dashboard"
COOKIE = "llamaserve_dashboard"
SESSION_TTL = timedelta(hours=12)
FORM_LIMIT = 4096  # bytes of the login form
HTML = b"text/html; charset=utf-8"
# The page runs only its own script and style: no inline script, nothing from elsewhere.
PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]
ASSETS = {"dashboard.css": b"text/css; charset=utf-8", "dashboard.js": b"text/javascript"}

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class Dashboard:
    """The ASGI app of every path under `/dashboard`."""

    def __init__(
        self,
        pool: Any,
        operator: Operator,
        scheduler: Scheduler,
        *,
        default_quota: int,
        default_period: str,
    ) -> None:
        self.pool = pool
        self.operator = operator
        self.scheduler = scheduler
        self.default_quota = default_quota
        self.default_period = default_period
        self.routes: dict[str, tuple[tuple[str, ...], Handler]] = {
            PREFIX: (("GET",), self._page),
            f"{PREFIX}/login": (("GET", "POST"), self._login),
            f"{PREFIX}/logout": (("POST",), self._logout),
            f"{PREFIX}/usage": (("GET",), self._usage),
            f"{PREFIX}/live": (("GET",), self._live),
            **{f"{PREFIX}/{name}": (("GET",), self._asset) for name in ASSETS},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        try:
            if path not in self.routes:
                raise NotFound(f"{path} is not a page of the dashboard.", code="not_found")
            methods, handler = self.routes[path]
            check_method(path, scope["method"], methods)
            await handler(scope, receive, send)
        except APIError as error:
            await send_error(send, error)

    # Pages

    async def _page(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await self._session(scope):
            await _redirect(send, f"{PREFIX}/login")
            return
        html = dashboard_page.page(await self._figures())
        await Answer(send, PAGE_HEADERS).whole(200, HTML, html.encode())

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            html = dashboard_page.login(enabled=self.operator.enabled)
            await Answer(send, PAGE_HEADERS).whole(200, HTML, html.encode())
            return
        form = parse_qs((await read_body(receive, scope, FORM_LIMIT)).decode("utf-8", "replace"))
        client = (scope.get("client") or ("-",))[0]
        if not self.operator.matches(form.get("key", [""])[0]):
            log.warning("dashboard: a login with a wrong admin key, from %s", client)
            html = dashboard_page.login(enabled=self.operator.enabled, refused=True)
            await Answer(send, PAGE_HEADERS).whole(401, HTML, html.encode())
            return
        token = secrets.token_urlsafe(32)
        with database_errors():
            async with self.pool.acquire() as conn:
                await dashboard.open_session(conn, token_hash=_hash(token), ttl=SESSION_TTL)
        log.info("dashboard: the operator logged in from %s", client)
        cookie = _cookie(scope, token, int(SESSION_TTL.total_seconds()))
        await _redirect(send, PREFIX, cookie)

    async def _logout(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _token(scope)
        if token is not None:
            with database_errors():
                async with self.pool.acquire() as conn:
                    await dashboard.close_session(conn, token_hash=_hash(token))
        await _redirect(send, f"{PREFIX}/login", _cookie(scope, "", 0))

    async def _asset(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path"].removeprefix(f"{PREFIX}/")
        body = resources.files("llamaserve.gateway").joinpath("static", name).read_bytes()
        await Answer(send, [(b"cache-control", b"no-cache")]).whole(200, ASSETS[name], body)

    # Data

    async def _usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._admit(scope)
        figures = await self._figures()
        await Answer(send, [(b"cache-control", b"no-store")]).json(_jsonable(asdict(figures)))

    async def _live(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._admit(scope)
        per_user = self.scheduler.per_user()  # by user id
        with database_errors():
            async with self.pool.acquire() as conn:
                ids = [u for u in per_user if isinstance(u, int)]
                names = await dashboard.usernames(conn, ids=ids)
        engines = [
            {"url": e.url, "healthy": e.healthy, "slots": e.capacity, "busy": e.in_flight}
            for e in self.scheduler.engines
        ]
        users = [
            {"username": names.get(user, str(user)) if isinstance(user, int) else str(user),
             "waiting": waiting, "generating": running}
            for user, (waiting, running) in per_user.items()
        ]  # fmt: skip
        users.sort(key=lambda u: str(u["username"]))
        live = {"engines": engines, "users": users, "waiting": self.scheduler.waiting}
        await Answer(send, [(b"cache-control", b"no-store")]).json(live)

    async def _admit(self, scope: Scope) -> None:
        """Let a session or the admin key (bearer) through; 401 to anyone else, 403 to a
        user's key."""
        authorization = header(scope, b"authorization")
        if authorization is not None:
            self.operator.check(authorization)
        elif not await self._session(scope):
            raise AuthenticationFailed(
                f"Log in at {PREFIX}/login, or send the admin key as a bearer token.",
                code="login_required",
            )

    async def _session(self, scope: Scope) -> bool:
        token = _token(scope)
        if token is None:
            return False
        with database_errors():
            async with self.pool.acquire() as conn:
                return await dashboard.session_open(conn, token_hash=_hash(token))

    async def _figures(self) -> Figures:
        with database_errors():
            async with self.pool.acquire() as conn:
                return await figures(
                    conn, default_quota=self.default_quota, default_period=self.default_period
                )


async def figures(conn: Any, *, default_quota: int, default_period: str) -> Figures:
    """The page's figures: its queries, one after another on one connection."""
    return Figures(
        now=await conn.fetchval("SELECT now()"),
        day=await dashboard.totals(conn, since=timedelta(hours=24)),
        week=await dashboard.totals(conn, since=timedelta(days=7)),
        hourly=await dashboard.series(conn, since=timedelta(hours=24), step="hour"),
        daily=await dashboard.series(conn, since=timedelta(days=7), step="day"),
        latency=await dashboard.latency(conn, since=timedelta(hours=24)),
        quotas=await quotas.current_usage(
            conn, default_quota=default_quota, default_period=default_period
        ),
    )


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _token(scope: Scope) -> str | None:
    """The session token the request's cookies carry, if any."""
    cookies = header(scope, b"cookie")
    if cookies is None:
        return None
    for pair in cookies.decode("latin-1").split(";"):
        name, _, value = pair.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


def _cookie(scope: Scope, token: str, max_age: int) -> bytes:
    """The session's cookie; `Secure` when the browser reached us over https (directly,
    or through a proxy that says so)."""
    secure = scope.get("scheme") == "https" or header(scope, b"x-forwarded-proto") == b"https"
    attributes = f"Max-Age={max_age}; Path={PREFIX}; HttpOnly; SameSite=Strict"
    return f"{COOKIE}={token}; {attributes}{'; Secure' if secure else ''}".encode()


async def _redirect(send: Send, location: str, cookie: bytes | None = None) -> None:
    headers = [(b"location", location.encode()), (b"cache-control", b"no-store")]
    if cookie is not None:
        headers.append((b"set-cookie", cookie))
    await Answer(send, headers).whole(
        303, b"text/plain; charset=utf-8", b"See " + location.encode()
    )


def _jsonable(value: Any) -> Any:
    """Figures as JSON can say them: times in ISO 8601."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
