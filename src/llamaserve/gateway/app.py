"""The gateway's ASGI application: its lifespan (pools, clients, background tasks),
health and readiness, and the hand-off of every other request to an Exchange with the
services it uses."""

from __future__ import annotations

import gc
import logging
from typing import Any

from starlette.types import Receive, Scope, Send

from llamaserve.config import Layout, Settings
from llamaserve.errors import APIError, ServiceUnavailable
from llamaserve.gateway import db_status
from llamaserve.gateway.admin import Operator
from llamaserve.gateway.admission import Admissions
from llamaserve.gateway.affinity import PrefixMap
from llamaserve.gateway.auth import Authenticator
from llamaserve.gateway.dashboard import Dashboard
from llamaserve.gateway.engines import EngineWatch
from llamaserve.gateway.exchange import Exchange, Services
from llamaserve.gateway.leases import Leases
from llamaserve.gateway.logbook import RequestLog
from llamaserve.gateway.metrics import Metrics
from llamaserve.gateway.quotas import Quotas
from llamaserve.gateway.scheduling import EngineState, QueueLimits, Scheduler
from llamaserve.gateway.slots import Slots
from llamaserve.gateway.stored import StoredResponses
from llamaserve.http import asgi
from llamaserve.http.answer import send_error, send_json
from llamaserve.http.stopping import InFlight
from llamaserve.http.upstream import Upstream
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
                fairness=settings.llama_proxy_fairness,
            ),
        )
        self.watch = EngineWatch(
            self.scheduler, self.upstream, settings.llama_proxy_health_interval
        )
        # Relays in flight: at a stop they get `Settings.stop_grace` seconds, then those
        # still going are ended with a clear error, so that none is cut off silently,
        # and each has its row (`http.stopping`).
        self.in_flight = InFlight(log)
        self.metrics = Metrics(settings)
        self.pool: Any = None
        self.auth: Authenticator
        self.admissions: Admissions
        self.leases: Leases
        self.requests: RequestLog
        self.stored: StoredResponses
        self.quotas: Quotas
        self.services: Services
        self.dashboard: Dashboard

    def _affinity(self) -> PrefixMap | None:
        """Where conversations went, to route by prefix (nothing to choose with one engine)."""
        several = len(self.scheduler.engines) > 1
        return PrefixMap() if several and self.settings.llama_proxy_routing == "prefix" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send, self.startup, self.shutdown)
        elif scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/dashboard") and path[10:11] in ("", "/"):
                await self.dashboard(scope, receive, send)
                return
            if path == "/metrics":
                await self.metrics.serve(scope, send)
                return
            if path not in ("/health", "/ready"):
                await Exchange(self.services, scope, receive, send).run()
                return
            try:
                check_method(path, scope["method"], "GET")
            except APIError as error:
                await send_error(send, error)
                return
            if path == "/health":
                await send_json(send, {"status": "ok"})
            else:
                await self._ready(send)

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
            default_quota=self.settings.llama_proxy_token_quota,
            default_period=self.settings.llama_proxy_quota_period,
            default_tpm=self.settings.llama_proxy_token_rate_limit,
        )
        self.quotas = Quotas(
            self.pool,
            default_quota=self.settings.llama_proxy_token_quota,
            default_period=self.settings.llama_proxy_quota_period,
            default_tpm=self.settings.llama_proxy_token_rate_limit,
        )
        self.leases = Leases(self.pool, self.settings.llama_proxy_user_concurrency, self.scheduler)
        await self.leases.start()
        self.requests = RequestLog(self.pool, self.layout.run / "request-log")
        await self.requests.start()
        self.stored = StoredResponses(
            self.pool,
            enabled=self.settings.llama_proxy_store_responses,
            keep=self.settings.responses_ttl(),
        )
        self.stored.start()
        self.services = Services(
            max_body=self.settings.llama_proxy_max_body_bytes,
            auth=self.auth,
            admissions=self.admissions,
            slots=Slots(self.scheduler, self.leases, self.watch, self.pool, self._affinity()),
            upstream=self.upstream,
            in_flight=self.in_flight,
            requests=self.requests,
            stored=self.stored,
            quotas=self.quotas,
            metrics=self.metrics,
        )
        self.dashboard = Dashboard(
            self.pool,
            Operator(self.settings.admin_key()),
            self.scheduler,
            default_quota=self.settings.llama_proxy_token_quota,
            default_period=self.settings.llama_proxy_quota_period,
        )
        self.metrics.watch(self.scheduler, self.admissions, self.requests, self.pool, self.settings)
        await self.upstream.open()
        await self.watch.probe_all()
        self.watch.start()
        # What exists now lives as long as the process: out of the garbage collector's
        # sight, a full collection no longer walks it, pausing every request in flight.
        gc.collect()
        gc.freeze()

    async def shutdown(self) -> None:
        self.in_flight.close()
        await self.watch.close()
        await self.leases.close()
        await self.stored.close()
        await self.quotas.close()
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
            await send_json(send, {"status": "ready"})
