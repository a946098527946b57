"""Runs the gateway under uvicorn (`llamaserve serve-gateway`)."""

from __future__ import annotations

import logging

import uvicorn

from llamaserve.config import Layout, Settings
from llamaserve.gateway.app import Gateway


def serve(settings: Settings, layout: Layout) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(
        f"llamaserve gateway: {settings.llama_proxy_host}:{settings.llama_proxy_port} -> "
        f"{settings.llama_server_backend_url}",
        flush=True,
    )
    uvicorn.run(
        Gateway(settings, layout),
        host=settings.llama_proxy_host,
        port=settings.llama_proxy_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # the gateway writes its own line per request, without secrets
        log_level="warning",
        # Streams in flight get this long to finish; then the request log is flushed.
        timeout_graceful_shutdown=max(1, int(settings.llama_stop_timeout) - 5),
    )
