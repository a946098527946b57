"""The operator's credential: `LLAMA_ADMIN_API_KEY`, which opens the gateway's
`/metrics` and `/dashboard` and nothing else. A user's key never does; without a usable
admin key nobody does."""

from __future__ import annotations

import hashlib
import hmac

from llamaserve.errors import AuthenticationFailed, PermissionDenied, bearer_token
from llamaserve.store import keys

# Compared against when no admin key is set, so that a refusal takes the same time.
_NOBODY = hashlib.sha256(b"no admin key is set").digest()


class Operator:
    """Checks a presented key against the admin key, in constant time."""

    def __init__(self, admin_key: str | None) -> None:
        self.enabled = admin_key is not None
        self._digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else _NOBODY

    def matches(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).digest()
        return hmac.compare_digest(digest, self._digest) and self.enabled

    def check(self, authorization: bytes | None) -> None:
        """Let the operator's `Authorization: Bearer` through; refuse anyone else with
        401 (no or a wrong key) or 403 (a user's key: valid or not, it opens nothing
        here)."""
        presented = bearer_token(authorization)
        if self.matches(presented):
            return
        if keys.key_id_of(presented) is not None:
            raise PermissionDenied(
                "A user's key does not open this page; it needs LLAMA_ADMIN_API_KEY.",
                code="admin_key_required",
            )
        raise AuthenticationFailed("Incorrect admin key provided.", code="invalid_api_key")
