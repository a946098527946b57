"""The engines behind the gateway: probed in the background for health and capacity.

An engine that fails a request is taken out at once and probed every interval until
it answers again; its slots come back to the scheduler then.
"""

from __future__ import annotations

import asyncio
import json
import logging

from llamaserve.errors import APIError
from llamaserve.gateway.scheduling import EngineState, Scheduler
from llamaserve.http.upstream import Upstream

log = logging.getLogger("llamaserve.gateway")

PROBE_SECONDS = 3.0  # a health probe's whole answer


class EngineWatch:
    def __init__(self, scheduler: Scheduler, upstream: Upstream, interval: float) -> None:
        self.scheduler = scheduler
        self.upstream = upstream
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(engine) for engine in self.scheduler.engines))
        self.scheduler.dispatch()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def take_out(self, engine: EngineState, reason: str) -> None:
        if engine.healthy:
            log.warning("engine %s taken out: %s", engine.url, reason)
        engine.healthy = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe_all()

    async def _probe(self, engine: EngineState) -> None:
        slots = await self.probe(engine.url)
        if slots is None:
            self.take_out(engine, "health probe failed")
            return
        if not engine.healthy:
            log.warning("engine %s is back (%d slots)", engine.url, slots)
        engine.healthy, engine.capacity = True, slots

    async def probe(self, url: str) -> int | None:
        """The engine's slots if it is healthy, else None.

        Llamaserve's engines say their slots in /health; an engine that does not is
        counted as one slot once its /v1/models answers. An engine that does not answer
        within PROBE_SECONDS is not healthy: it is hung (stopped, swapping, wedged), and
        requests sent to it would wait for LLAMA_PROXY_UPSTREAM_TIMEOUT.
        """
        try:
            async with asyncio.timeout(PROBE_SECONDS):  # not the answers' long silence
                async with self.upstream.send(url, "GET", "/health") as reply:
                    raw = await reply.read()
                if reply.status == 200:
                    slots = json.loads(raw).get("slots", 1)
                    return slots if isinstance(slots, int) and slots > 0 else 1
                if reply.status != 404:
                    return None
                async with self.upstream.send(url, "GET", "/v1/models") as reply:
                    await reply.read()
                return 1 if reply.status == 200 else None
        except (APIError, ValueError, AttributeError, TimeoutError):
            return None
