"""The gateway's ASGI application: its lifespan (pools, clients, background tasks),
health and readiness, and the hand-off of every other request to an Exchange."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from typing import Any

from starlette.types import Receive, Scope, Send

from llamaserve.config import Layout, Settings
from llamaserve.errors import APIError, ServiceUnavailable, send_error
from llamaserve.gateway import db_status
from llamaserve.gateway.admission import Admissions
from llamaserve.gateway.auth import Authenticator
from llamaserve.gateway.engines import EngineWatch
from llamaserve.gateway.exchange import Exchange
from llamaserve.gateway.leases import Leases
from llamaserve.gateway.logbook import RequestLog
from llamaserve.gateway.scheduling import EngineState, QueueLimits, Scheduler
from llamaserve.gateway.upstream import Upstream
from llamaserve.routes import check_method
from llamaserve.store import db, migrations

log = logging.getLogger("llamaserve.gateway")


class Gateway:
    """The ASGI app. Pools and clients are made in the lifespan, not at import."""

    def __init__(self, settings: Settings, layout: Layout) -> None:
        self.settings = settings
        self.layout = layout
        self.upstream = Upstream(
            settings.llama_server_api_key, settings.llama_proxy_upstream_timeout
        )
        self.scheduler = Scheduler(
            [EngineState(url) for url in settings.backend_urls()],
            QueueLimits(
                per_user=settings.llama_proxy_user_concurrency,
                queue_size=settings.llama_proxy_queue_size,
                user_queue_size=settings.llama_proxy_user_queue_size,
                max_wait=settings.llama_proxy_queue_timeout,
                reserved=settings.llama_proxy_reserved_slots,
            ),
        )
        self.watch = EngineWatch(
            self.scheduler, self.upstream, settings.llama_proxy_health_interval
        )
        self.exchanges: set[Exchange] = set()  # those relaying an engine's answer
        self.grace_over = False  # stopping, and requests still going are being ended
        self._stopping: asyncio.Task[None] | None = None
        self.pool: Any = None
        self.auth: Authenticator
        self.admissions: Admissions
        self.leases: Leases
        self.requests: RequestLog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            path = scope["path"]
            if path not in ("/health", "/ready"):
                await Exchange(self, scope, receive, send).run()
                return
            try:
                check_method(path, scope["method"], "GET")
            except APIError as error:
                await send_error(send, error)
                return
            if path == "/health":
                await _send_json(send, 200, {"status": "ok"})
            else:
                await self._ready(send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            await self.startup()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self) -> None:
        db_status.status.describe(self.settings, self.layout)
        db_status.watch_pool_reconnects()
        # Admission commits a rate-limit update per request; waiting for its WAL flush
        # would cost milliseconds for bookkeeping that a crash may safely forget. The
        # request log sets its own batches back to durable.
        self.pool = await db.create_pool(
            self.settings, self.layout, min_size=2, max_size=20, durable_commits=False
        )
        async with self.pool.acquire() as conn:
            await migrations.check_schema(conn)
        self.auth = Authenticator(self.pool, self.settings.llama_server_api_key)
        self.admissions = Admissions(
            self.pool,
            self.settings.llama_proxy_rate_limit,
            self.settings.llama_proxy_rate_window_seconds,
        )
        self.leases = Leases(self.pool, self.settings.llama_proxy_user_concurrency, self.scheduler)
        await self.leases.start()
        self.requests = RequestLog(self.pool, self.layout.run / "request-log")
        await self.requests.start()
        await self.upstream.open()
        await self.watch.probe_all()
        self.watch.start()
        # What exists now lives as long as the process: out of the garbage collector's
        # sight, a full collection no longer walks it, pausing every request in flight.
        gc.collect()
        gc.freeze()

    def begin_stop(self) -> None:
        """The server stops taking connections (`console.sh stop`): requests in flight
        get `Settings.stop_grace` seconds, then those still going are ended with a clear
        error (see `Exchange.cut_off`), so that none is cut off silently, and each has
        its row."""
        if self._stopping is None:
            grace = self.settings.stop_grace()
            log.warning("stopping: requests in flight get %gs to finish", grace)
            self._stopping = asyncio.create_task(self._cut_off_after(grace), name="stop")

    async def _cut_off_after(self, grace: float) -> None:
        await asyncio.sleep(grace)
        self.grace_over = True
        if self.exchanges:
            log.warning("stopping: ending %d requests still in flight", len(self.exchanges))
        for exchange in list(self.exchanges):
            exchange.cut_off()

    async def shutdown(self) -> None:
        if self._stopping is not None:
            self._stopping.cancel()
        await self.watch.close()
        await self.leases.close()
        await self.requests.close()
        await self.upstream.close()
        await self.pool.close()

    async def _ready(self, send: Send) -> None:
        problems = []
        try:
            async with self.pool.acquire() as conn:
                await migrations.check_schema(conn)
        except Exception as exc:
            problems.append(f"database: {exc}")
        await self.watch.probe_all()
        if not any(engine.healthy for engine in self.scheduler.engines):
            problems.append("engine: not reachable")
        if problems:
            await send_error(send, ServiceUnavailable("Not ready: " + "; ".join(problems)))
        else:
            await _send_json(send, 200, {"status": "ready"})


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
