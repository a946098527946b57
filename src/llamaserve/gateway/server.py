"""Runs the gateway under uvicorn (`llamaserve serve-gateway`).

One process and one thread: uvicorn parses HTTP with httptools on the uvloop event loop
that runs the gateway, so a request never waits for a hand-off between threads (the
fair queue and the engines' slots are one process's state). Figures in
docs/performance.md.

On SIGTERM (`console.sh stop`) or SIGINT uvicorn stops taking connections and waits for
the requests in flight; the gateway gives them `Settings.stop_grace` seconds, then ends
those still going with a clear error (`http.stopping`), so that none is cut off
silently, and each has its row. uvicorn's own graceful timeout is only the last resort.
"""

from __future__ import annotations

import logging
import math
import resource

import uvicorn

from llamaserve import logs
from llamaserve.config import Layout, Settings
from llamaserve.gateway.app import Gateway
from llamaserve.http.server import CorkedHeads, Server, bounded_heads

KEEP_ALIVE_SECONDS = 75  # as nginx's default
OPEN_FILES = 65536  # the soft limit the gateway asks for (a connection or two per request)


def serve(settings: Settings, layout: Layout) -> None:
    """Serve until stopped. A gateway that cannot start (its database, its port) logs
    why and exits with uvicorn's status 3 (1 for a port it cannot bind)."""
    logs.configure()  # every line escaped: a path may hold CR LF (see logs.py)
    print(
        f"llamaserve gateway: {settings.llama_proxy_host}:{settings.llama_proxy_port} -> "
        f"{settings.llama_server_backend_url}",
        flush=True,
    )
    _raise_open_files_limit()
    gateway = Gateway(settings, layout)

    config = uvicorn.Config(
        gateway,
        host=settings.llama_proxy_host,
        port=settings.llama_proxy_port,
        loop="uvloop",
        http=bounded_heads(settings.llama_header_timeout, CorkedHeads),  # httptools
        ws="none",  # no WebSocket: an upgrade is an ordinary request, refused as such
        lifespan="on",  # pools, clients, background tasks; a failed startup stops it
        log_config=None,  # its lines go to the root logger's handler, escaped as all others
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
    Server(config, gateway.in_flight, settings.stop_grace(), exit_zero=True).run()


def _raise_open_files_limit() -> None:
    """Each connection (a client's, an engine's, the database's) is an open file, and a
    usual soft limit is 1024: raised to the hard limit, up to OPEN_FILES."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        logging.getLogger("llamaserve.gateway").warning(
            "open files limited to %d (could not raise it: %s)", soft, exc
        )
