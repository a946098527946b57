"""How an engine's front is served: uvicorn with bounded heads, an `x-request-id` on
every answer, and the stop of what is in flight (`http.stopping`): the requests still
going when `Settings.stop_grace` is over are ended with a clear error, not cut."""

from __future__ import annotations

import logging

import uvicorn
from starlette.types import ASGIApp

from llamaserve.http.asgi import RequestIds
from llamaserve.http.server import Server, bounded_heads, without_health_probes
from llamaserve.http.stopping import EndOnStop, InFlight


def serve(app: ASGIApp, *, host: str, port: int, grace: float, header_timeout: float) -> Server:
    """The server for an engine's front `app` (not yet running)."""
    in_flight = InFlight(logging.getLogger("llamaserve.engine"))
    config = uvicorn.Config(
        RequestIds(EndOnStop(app, in_flight)),  # outside: the stop's own answers get an id
        host=host,
        port=port,
        http=bounded_heads(header_timeout),  # httptools, heads bounded
        # The access log names the connection's address: an X-Forwarded-For from a local
        # client is not believed (uvicorn's default trusts it from 127.0.0.1).
        proxy_headers=False,
        log_level="info",
        timeout_graceful_shutdown=int(grace) + 2,
    )
    logging.getLogger("uvicorn.access").addFilter(without_health_probes)  # after its setup
    return Server(config, in_flight, grace, exit_zero=False)
