"""Who is calling: a user's bearer key, checked against its stored hash in constant time."""

from __future__ import annotations

import hmac
from collections import OrderedDict
from typing import Any

from pydantic import SecretStr

from llamaserve.errors import AuthenticationFailed, bearer_token
from llamaserve.gateway.database import database_errors
from llamaserve.store import keys, limits

_DUMMY_HASH = keys.hash_key("lsk_0000000000_" + "0" * 43)


class Authenticator:
    """Turns an Authorization header into a key id, or raises AuthenticationFailed.

    A key's hash never changes (rotating makes a new key id), so hashes are cached;
    whether the key is still valid is checked on every request by the admission query.
    """

    def __init__(self, pool: Any, engine_key: SecretStr, cache_size: int = 10_000) -> None:
        self._pool = pool
        self._engine_key = engine_key.get_secret_value().encode()
        self._hashes: OrderedDict[str, bytes | None] = OrderedDict()
        self._cache_size = cache_size

    async def authenticate(self, authorization: bytes | None) -> str:
        key = bearer_token(authorization)
        key_id = keys.key_id_of(key)
        if key_id is None:
            if hmac.compare_digest(key.encode(), self._engine_key):
                raise AuthenticationFailed(
                    "The engine's own key is not accepted by the gateway; use your user key.",
                    code="invalid_api_key",
                )
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        stored = await self._stored_hash(key_id)
        # Compare even for an unknown key id, so that timing tells nothing about which exist.
        matches = hmac.compare_digest(keys.hash_key(key), stored or _DUMMY_HASH)
        if stored is None or not matches:
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        return key_id

    def forget(self, key_id: str) -> None:
        self._hashes.pop(key_id, None)

    async def _stored_hash(self, key_id: str) -> bytes | None:
        if key_id in self._hashes:
            self._hashes.move_to_end(key_id)
            return self._hashes[key_id]
        with database_errors():
            stored = await limits.key_hash(self._pool, key_id=key_id)
        if stored is not None:  # unknown ids are not cached: the key may be created soon
            self._hashes[key_id] = stored
            if len(self._hashes) > self._cache_size:
                self._hashes.popitem(last=False)
        return stored
