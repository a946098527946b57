"""API keys: their format, generation and hashing. Only a key's hash is ever stored.

A key reads `lsk_<key id>_<secret>`: `lsk_` makes it recognisable (in a leak scan,
say), the 10-hex-digit key id names it in lists and logs, and the secret is 32
random bytes, URL-safe. The stored hash is SHA-256 of the whole key: the secret's
256 bits of entropy make a slow password hash unnecessary.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

PREFIX = "lsk_"
_KEY = re.compile(r"^lsk_([0-9a-f]{10})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once, to the person who creates it
    key_id: str
    key_hash: bytes


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def generate_key() -> NewKey:
    key_id = secrets.token_hex(5)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key, key_id, hash_key(key))


def key_id_of(key: str) -> str | None:
    """The key id inside a well-formed key, or None."""
    match = _KEY.match(key)
    return match.group(1) if match else None
