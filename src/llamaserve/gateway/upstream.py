"""The HTTP client to the engines. Every network and engine failure is mapped to the
error family here, and nowhere else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import aiohttp
from pydantic import SecretStr

from llamaserve.errors import APIError, ServiceUnavailable, UpstreamFailed, UpstreamTimeout

# Idle connections are dropped before the server's own keep-alive timeout (5 s for
# uvicorn and llama-server), so that a request never goes out on a connection the
# server is closing (aiohttp's default, 15 s, races with it: ServerDisconnectedError).
KEEPALIVE_SECONDS = 3.0


@dataclass
class Reply:
    """An engine's answer whose body may still be arriving."""

    status: int
    content_type: str
    response: aiohttp.ClientResponse

    async def read(self) -> bytes:
        with map_errors():
            return await self.response.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        with map_errors():
            async for chunk in self.response.content.iter_any():
                yield chunk


@contextmanager
def map_errors() -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise ServiceUnavailable(f"The engine is not reachable ({exc.strerror}).") from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout("The engine did not answer in time.") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(f"The engine failed: {type(exc).__name__}.") from exc


class Upstream:
    """A pooled HTTP client to the engines that adds the engine's own key."""

    def __init__(self, engine_key: SecretStr, read_timeout: float) -> None:
        self._auth = f"Bearer {engine_key.get_secret_value()}"
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=KEEPALIVE_SECONDS, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @asynccontextmanager
    async def send(self, url: str, method: str, path: str, body: bytes) -> AsyncIterator[Reply]:
        """Send a request; the reply is released (and the engine told, if unfinished) on exit."""
        assert self._session is not None, "Upstream.open() was not called"
        headers = {"Authorization": self._auth}
        if body:
            headers["Content-Type"] = "application/json"
        with map_errors():
            response = await self._session.request(
                method, url + path, data=body or None, headers=headers
            )
        try:
            yield Reply(response.status, response.content_type, response)
        finally:
            # Closing an unfinished response drops the connection: the engine sees the
            # client go away and stops generating.
            if not response.content.at_eof():
                response.close()
            else:
                response.release()

    async def probe(self, url: str) -> int | None:
        """The engine's slots if it is healthy, else None.

        Llamaserve's engines say their slots in /health; an engine that does not is
        counted as one slot once its /v1/models answers.
        """
        try:
            async with self.send(url, "GET", "/health", b"") as reply:
                raw = await reply.read()
            if reply.status == 200:
                slots = json.loads(raw).get("slots", 1)
                return slots if isinstance(slots, int) and slots > 0 else 1
            if reply.status != 404:
                return None
            async with self.send(url, "GET", "/v1/models", b"") as reply:
                await reply.read()
            return 1 if reply.status == 200 else None
        except (APIError, ValueError, AttributeError):
            return None
