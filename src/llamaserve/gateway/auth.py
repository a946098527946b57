"""Who is calling: a user's key (a bearer token, or Anthropic's `x-api-key`), checked
against its stored hash in constant time."""

from __future__ import annotations

import hmac
from collections import OrderedDict
from typing import Any

from pydantic import SecretStr

from llamaserve.errors import AuthenticationFailed, api_key
from llamaserve.gateway.db_status import database_errors
from llamaserve.store import keys, limits

_DUMMY_HASH = keys.hash_key("lsk_0000000000_" + "0" * 43)


class Authenticator:
    """Turns an Authorization (or x-api-key) header into a key id, or raises
    AuthenticationFailed.

    A key's hash never changes (rotating makes a new key id), so the hashes of accepted
    keys are cached and a right key passes without a round trip; whether the key is
    still valid is checked on every request by the admission query. A key that does not
    match is never refused from the cache: every refusal asks the database as one of an
    unknown key id does, so that neither its time nor its answer (a 503 when the
    database cannot answer) tells which key ids exist. Unknown ids are not remembered:
    a key made a moment ago, through any gateway's database, works at once.
    """

    def __init__(self, pool: Any, engine_key: SecretStr, cache_size: int = 10_000) -> None:
        self._pool = pool
        self._engine_key = engine_key.get_secret_value().encode()
        self._hashes: OrderedDict[str, bytes] = OrderedDict()
        self._cache_size = cache_size

    async def authenticate(
        self, authorization: bytes | None, x_api_key: bytes | None = None
    ) -> str:
        key = api_key(authorization, x_api_key)
        key_id = keys.key_id_of(key)
        if key_id is None:
            if hmac.compare_digest(key.encode(), self._engine_key):
                raise AuthenticationFailed(
                    "The engine's own key is not accepted by the gateway; use your user key.",
                    code="invalid_api_key",
                )
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        digest = keys.hash_key(key)
        cached = self._hashes.get(key_id)
        if cached is not None and hmac.compare_digest(digest, cached):
            self._hashes.move_to_end(key_id)
            return key_id
        with database_errors():
            stored = await limits.key_hash(self._pool, key_id=key_id)
        # Compared even for an unknown key id, so that it takes the same time as a known one;
        # nothing is cached before the key is accepted, so that neither refusal does more.
        if not hmac.compare_digest(digest, stored or _DUMMY_HASH) or stored is None:
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        self._remember(key_id, stored)
        return key_id

    def _remember(self, key_id: str, stored: bytes) -> None:
        self._hashes[key_id] = stored
        if len(self._hashes) > self._cache_size:
            self._hashes.popitem(last=False)
