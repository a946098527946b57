"""Runs the gateway under granian (`llamaserve serve-gateway`).

granian parses HTTP and writes the answers on a Rust thread of its own, beside the
Python event loop that runs the gateway, and sends a whole answer in one write (status
line, headers and body). At 32 clients on two shared cores that lowered the gateway's
added latency against uvicorn, for more CPU per request (the hand-offs between the
two threads); figures in the README's "Process".

One worker process, forked by a supervisor that forwards signals to it and exits with
it: the fair queue and the engines' slots are one process's state.
"""

from __future__ import annotations

import logging
import math

from granian.constants import HTTPModes, Interfaces, Loops
from granian.log import LogLevels
from granian.server import Server

from llamaserve.config import Settings, load_settings
from llamaserve.gateway.app import Gateway


def serve(settings: Settings) -> None:
    print(
        f"llamaserve gateway: {settings.llama_proxy_host}:{settings.llama_proxy_port} -> "
        f"{settings.llama_server_backend_url}",
        flush=True,
    )
    Server(
        "llamaserve.gateway.server:worker_app",
        factory=True,  # made in the worker, from the same settings
        address=settings.llama_proxy_host,
        port=settings.llama_proxy_port,
        interface=Interfaces.ASGI,  # with lifespan: pools, clients, background tasks
        http=HTTPModes.http1,
        loop=Loops.uvloop,
        workers=1,
        runtime_threads=1,  # the Rust side's I/O thread; Python runs on the worker's own
        blocking_threads=1,
        log_level=LogLevels.warning,
        log_access=False,  # the gateway writes its own line per request, without secrets
        # The gateway ends what is still in flight after its grace (`Settings.stop_grace`) and
        # writes the rows; this is the last resort, before `console.sh stop`'s SIGKILL.
        workers_kill_timeout=max(1, math.ceil(settings.llama_stop_timeout) - 1),
    ).serve()


def worker_app() -> Gateway:
    """The gateway of the worker process: settings read as the supervisor read them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return Gateway(*load_settings())
