"""The gateway's metrics, in Prometheus' text format at `GET /metrics`, for the operator
only (`LLAMA_ADMIN_API_KEY`, `Operator`): what each gateway did and holds. Several
gateways each export their own; PromQL sums them (docs/monitoring.md).

Counted as each request's row is finished (`Exchange._finish`, once per row, with the
row's own values: the counters equal the request log's sums, cancelled requests
included): requests by user, route and outcome; tokens by user; refusals by user;
latency, time to first token and queue wait by route. Read at scrape time
(`_Collector`): the fair queue and the engines (`Scheduler`), the request log's backlog
(`RequestLog`), and quotas from the database (`store.quotas`, cached a few seconds).

A user is a label (`user`, their name) unless LLAMA_PROXY_METRICS_USER_LABEL is off;
then every per-user series is summed. The counting costs a request a few microseconds:
the labelled series are kept by user and route, not looked up label by label.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from starlette.types import Scope, Send

from llamaserve.config import Settings
from llamaserve.errors import APIError, QuotaExceeded, RateLimited, TokenRateLimited
from llamaserve.gateway.admin import Operator
from llamaserve.gateway.admission import Admissions
from llamaserve.gateway.logbook import RequestLog
from llamaserve.gateway.scheduling import Scheduler
from llamaserve.http import asgi
from llamaserve.http.answer import Answer, send_error
from llamaserve.routes import check_method, route_of
from llamaserve.store import quotas
from llamaserve.store.quotas import QuotaUsage
from llamaserve.store.requests import RequestRow

log = logging.getLogger("llamaserve.gateway")

NO_USER = "(none)"  # a request refused before its user was known; never a username
# The text format every Prometheus reads; with names and labels in plain ASCII, it is the
# same bytes as its version 1.0.0 (prometheus_client's latest, which Prometheus 2 does
# not name).
TEXT_FORMAT = b"text/plain; version=0.0.4; charset=utf-8"
QUOTA_SECONDS = 5.0  # how long quotas read from the database are shown before read again
QUOTA_TIMEOUT = 2.0  # seconds a scrape waits for them; without them, it goes on
# Seconds. Generation takes seconds to minutes; the API's other answers milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def refusal_reason(error: APIError | None) -> str | None:
    """Why a user's request was refused by their limits, as `llamaserve_refusals_total`
    says it; None for anything else."""
    if isinstance(error, QuotaExceeded):
        return "quota"
    if isinstance(error, TokenRateLimited):
        return "token_rate_limit"
    if isinstance(error, RateLimited):
        return "rate_limit" if error.code == "rate_limit_exceeded" else error.code
    return None


class Metrics:
    """The metrics of one gateway, in a registry of its own (never the process's global
    one: a process may hold several gateways, as the tests do)."""

    def __init__(self, settings: Settings) -> None:
        # fmt: off
        self.registry = CollectorRegistry(auto_describe=False)
        self.by_user = settings.llama_proxy_metrics_user_label
        self.operator = Operator(settings.admin_key())
        users = ("user",) if self.by_user else ()
        counter = partial(Counter, registry=self.registry)
        histogram = partial(Histogram, labelnames=["path"], registry=self.registry)
        self._requests = counter("llamaserve_requests", "Requests answered, by user, route, "
            "outcome (ok, error, rejected, cancelled) and status class (2xx...).",
            [*users, "path", "outcome", "status"])
        self._prompt = counter("llamaserve_prompt_tokens", "Prompt tokens of the requests "
            "answered, as in the request log.", users)
        self._completion = counter("llamaserve_completion_tokens", "Completion tokens of "
            "the requests answered, as in the request log.", users)
        self._refusals = counter("llamaserve_refusals", "Requests refused by their user's "
            "limits, by reason (rate_limit, token_rate_limit, quota, user_queue_full).",
            [*users, "reason"])
        self._latency = histogram("llamaserve_request_duration_seconds", "Time from a "
            "request's arrival to its answer's end, by route.", buckets=LATENCY_BUCKETS)
        self._ttft = histogram("llamaserve_time_to_first_token_seconds", "Time from a "
            "streamed request's arrival to its first generated token, by route.",
            buckets=TTFT_BUCKETS)
        self._queue = histogram("llamaserve_queue_wait_seconds", "Time a generating "
            "request waited for an engine's slot, by route.", buckets=QUEUE_BUCKETS)
        # fmt: on
        # The labelled series, by user, route and outcome: a request finds each in one lookup.
        self._requests_of: dict[tuple[str, str, str, int], Counter] = {}
        self._tokens: dict[str, tuple[Counter, Counter]] = {}
        self._timings: dict[str, tuple[Histogram, Histogram, Histogram]] = {}
        self._collector: _Collector | None = None

    def watch(
        self,
        scheduler: Scheduler,
        admissions: Admissions,
        requests: RequestLog,
        pool: Any,
        settings: Settings,
    ) -> None:
        """Read the live state at each scrape too (once the gateway's services exist)."""
        self._collector = _Collector(self.by_user, scheduler, admissions, requests, pool, settings)
        self.registry.register(self._collector)

    def count(self, row: RequestRow, error: APIError | None) -> None:
        """Count a finished request, from its row as the request log gets it."""
        path = route_of(row.path)
        user = row.username or NO_USER
        users = (user,) if self.by_user else ()
        kind = (user, path, row.outcome, row.status // 100)
        requests = self._requests_of.get(kind)
        if requests is None:
            requests = self._requests_of[kind] = self._requests.labels(
                *users, path, row.outcome, f"{row.status // 100}xx"
            )
        requests.inc()
        tokens = self._tokens.get(user)
        if tokens is None:
            tokens = self._tokens[user] = (_series(self._prompt, users),
                                           _series(self._completion, users))  # fmt: skip
        if row.prompt_tokens:
            tokens[0].inc(row.prompt_tokens)
        if row.completion_tokens:
            tokens[1].inc(row.completion_tokens)
        timings = self._timings.get(path)
        if timings is None:
            timings = self._timings[path] = (
                self._latency.labels(path),
                self._ttft.labels(path),
                self._queue.labels(path),
            )
        timings[0].observe(row.latency_ms / 1000)
        if row.ttft_ms is not None:
            timings[1].observe(row.ttft_ms / 1000)
        if row.queue_ms is not None:
            timings[2].observe(row.queue_ms / 1000)
        if error is not None and (reason := refusal_reason(error)) is not None:
            self._refusals.labels(*users, reason).inc()

    async def serve(self, scope: Scope, send: Send) -> None:
        """GET /metrics, for the operator's key only (401 without it, 403 with a user's)."""
        try:
            check_method(scope["path"], scope["method"], "GET")
            self.operator.check(asgi.header(scope, b"authorization"))
        except APIError as error:
            await send_error(send, error)
            return
        if self._collector is not None:
            await self._collector.read_quotas()
        body = generate_latest(self.registry)
        await Answer(send).whole(200, TEXT_FORMAT, body)


def _series(metric: Counter, labels: tuple[str, ...]) -> Counter:
    """The series of `metric` with these label values (the metric itself without labels)."""
    return metric.labels(*labels) if labels else metric


class _Collector:
    """The gauges read at scrape time: the fair queue, the engines, the request log's
    backlog, and the users' quotas (read from the database by `read_quotas` first)."""

    def __init__(
        self,
        by_user: bool,
        scheduler: Scheduler,
        admissions: Admissions,
        requests: RequestLog,
        pool: Any,
        settings: Settings,
    ) -> None:
        self.by_user = by_user
        self.scheduler = scheduler
        self.admissions = admissions
        self.requests = requests
        self.pool = pool
        self.default_quota = settings.llama_proxy_token_quota
        self.default_period = settings.llama_proxy_quota_period
        self.quotas: dict[str, QuotaUsage] = {}
        self.read_at = float("-inf")  # monotonic

    async def read_quotas(self) -> None:
        """The users' quotas, read again when those shown are older than QUOTA_SECONDS.
        A database that does not answer leaves them out (not shown stale)."""
        if time.monotonic() - self.read_at < QUOTA_SECONDS:
            return
        try:
            async with asyncio.timeout(QUOTA_TIMEOUT), self.pool.acquire() as conn:
                self.quotas = await quotas.current_usage(
                    conn, default_quota=self.default_quota, default_period=self.default_period
                )
        except Exception as exc:
            log.warning("metrics: quotas not read (%s: %s)", type(exc).__name__, exc)
            self.quotas = {}
        self.read_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        load = self.scheduler.per_user()
        waiting = {user: queued for user, (queued, _) in load.items() if queued}
        generating = {user: running for user, (_, running) in load.items() if running}
        names = self.admissions.usernames() if waiting or generating else {}
        yield self._per_user(
            "llamaserve_queue_depth",
            "Requests waiting for an engine's slot in this gateway's fair queue.",
            waiting,
            names,
        )
        yield self._per_user(
            "llamaserve_requests_generating",
            "Requests of this gateway holding an engine's slot.",
            generating,
            names,
        )
        yield from self._engines()
        yield from self._quotas()
        yield GaugeMetricFamily(
            "llamaserve_request_log_rows_waiting",
            "Request log rows queued in memory, not written yet.",
            self.requests.waiting,
        )
        yield GaugeMetricFamily(
            "llamaserve_request_log_rows_spooled",
            "Request log rows kept on disk until the database takes them.",
            self.requests.spooled(),
        )

    def _per_user(
        self, name: str, doc: str, counts: dict[Hashable, int], names: dict[Any, str]
    ) -> GaugeMetricFamily:
        if not self.by_user:
            return GaugeMetricFamily(name, doc, sum(counts.values()))
        family = GaugeMetricFamily(name, doc, labels=["user"])
        for user, count in counts.items():
            family.add_metric([names.get(user, f"#{user}")], count)
        return family

    def _engines(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "llamaserve_engine_up",
            "Whether the engine answers its health probe (1) or is taken out (0).",
            labels=["engine"],
        )
        slots = GaugeMetricFamily(
            "llamaserve_engine_slots",
            "Requests the engine generates at once, as it said last.",
            labels=["engine"],
        )
        busy = GaugeMetricFamily(
            "llamaserve_engine_slots_busy",
            "The engine's slots this gateway's requests hold.",
            labels=["engine"],
        )
        for engine in self.scheduler.engines:
            up.add_metric([engine.url], 1 if engine.healthy else 0)
            slots.add_metric([engine.url], engine.capacity)
            busy.add_metric([engine.url], engine.in_flight)
        return iter((up, slots, busy))

    def _quotas(self) -> Iterator[Metric]:
        families = {
            "tokens": GaugeMetricFamily(
                "llamaserve_quota_tokens", "A user's token quota per period.", labels=["user"]
            ),
            "used": GaugeMetricFamily(
                "llamaserve_quota_used_tokens",
                "Tokens a user was charged in the quota's current period.",
                labels=["user"],
            ),
            "left": GaugeMetricFamily(
                "llamaserve_quota_left_tokens",
                "Tokens left of a user's quota in its current period (less those reserved).",
                labels=["user"],
            ),
        }
        if not self.by_user:
            totals = {key: sum(getattr(q, key) for q in self.quotas.values()) for key in families}
            families = {
                key: GaugeMetricFamily(f.name, f.documentation, totals[key])
                for key, f in families.items()
            }
        else:
            for username, usage in self.quotas.items():
                for key, family in families.items():
                    family.add_metric([username], getattr(usage, key))
        return iter(families.values())
