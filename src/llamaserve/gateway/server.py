"""Runs the gateway under uvicorn (`llamaserve serve-gateway`).

One process and one thread: uvicorn parses HTTP with httptools on the uvloop event loop
that runs the gateway, so a request never waits for a hand-off between threads (the
fair queue and the engines' slots are one process's state). Figures in the README's
"Process".

On SIGTERM (`console.sh stop`) or SIGINT uvicorn stops taking connections and waits for
the requests in flight; the gateway gives them `Settings.stop_grace` seconds, then ends
those still going with a clear error (`Gateway.begin_stop`), so that none is cut off
silently, and each has its row. uvicorn's own graceful timeout is only the last resort.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Iterator

import uvicorn

from llamaserve.config import Layout, Settings
from llamaserve.gateway.app import Gateway

KEEP_ALIVE_SECONDS = 75  # as nginx's default


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._gateway.begin_stop()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # The stop a signal asked for is done: exit 0, not by the signal raised again
            # (uvicorn's way, for programs that embed it).
            self._captured_signals.clear()


def serve(settings: Settings, layout: Layout) -> None:
    """Serve until stopped. A gateway that cannot start (its database, its port) logs
    why and exits with uvicorn's status 3 (1 for a port it cannot bind)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(
        f"llamaserve gateway: {settings.llama_proxy_host}:{settings.llama_proxy_port} -> "
        f"{settings.llama_server_backend_url}",
        flush=True,
    )
    gateway = Gateway(settings, layout)
    config = uvicorn.Config(
        gateway,
        host=settings.llama_proxy_host,
        port=settings.llama_proxy_port,
        loop="uvloop",
        http="httptools",
        ws="none",  # no WebSocket: an upgrade is an ordinary request, refused as such
        lifespan="on",  # pools, clients, background tasks; a failed startup stops it
        log_level="warning",
        access_log=False,  # the gateway writes its own line per request, without secrets
        # The client address logged is the connection's: an X-Forwarded-For from a local
        # client is not believed (uvicorn's default trusts it from 127.0.0.1).
        proxy_headers=False,
        server_header=False,
        # Idle client connections stay open longer than clients keep them (httpx, the
        # OpenAI SDK's client: 5 s; aiohttp: 15 s), so that a client never sends a
        # request on a connection the gateway is closing as idle (uvicorn's default: 5 s).
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        # The gateway ends what is still in flight after its grace and writes the rows;
        # this is the last resort, before `console.sh stop`'s SIGKILL.
        timeout_graceful_shutdown=max(1, math.ceil(settings.llama_stop_timeout) - 1),
    )
    _Server(config, gateway).run()
