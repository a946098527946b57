"""Users and their API keys: the SQL behind the user CLI.

Keys are made by store/keys.py; only their id and hash reach the database. Deleting a
user deletes its keys, rate-limit and quota state (ON DELETE CASCADE) but keeps its rows
in `llama_requests` for accounting: their user_id becomes NULL, their username stays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

import asyncpg

from llamaserve.config import parse_period
from llamaserve.store.errors import InvalidValue, NoSuchKey, NoSuchUser, UserExists
from llamaserve.store.keys import NewKey, generate_key

USERNAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_INT = 2**31 - 1  # PostgreSQL's integer
RECENT = timedelta(hours=24)
_USER_COLUMNS = """id, username, enabled, rate_limit, rate_window_seconds, token_rate_limit,
    token_quota, quota_period, created_at"""
_KEY_COLUMNS = """k.key_id, u.username, k.created_at, k.expires_at, k.revoked_at,
    CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked'
         WHEN k.expires_at <= now() THEN 'expired'
         ELSE 'active' END AS state"""


@dataclass(frozen=True)
class User:
    id: int
    username: str
    enabled: bool
    rate_limit: int | None  # None: the gateway's default; 0: no limit
    rate_window_seconds: int | None  # None: the gateway's default
    token_rate_limit: int | None  # tokens per minute; None: the gateway's default; 0: none
    token_quota: int | None  # tokens per period; None: the gateway's default; 0: none
    quota_period: str | None  # day, week, month or 21600s; None: the gateway's default
    created_at: datetime


@dataclass(frozen=True)
class UserSummary(User):
    active_keys: int
    last_used: datetime | None  # the latest request in the log
    requests_24h: int
    tokens_24h: int  # prompt and completion


@dataclass(frozen=True)
class Key:
    key_id: str
    username: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    state: str  # active | revoked | expired


@dataclass(frozen=True)
class DeletedUser:
    username: str
    keys: int  # deleted with the user
    requests_kept: int  # log rows kept, with user_id NULL


def check_username(username: str) -> str:
    if not USERNAME.match(username):
        raise InvalidValue(
            f"invalid username {username!r}: use 1 to 63 lowercase letters, digits, "
            "'.', '_' or '-', starting with a letter or a digit"
        )
    return username


def check_limits(rate_limit: int | None, rate_window_seconds: int | None) -> None:
    if rate_limit is not None and not 0 <= rate_limit <= MAX_INT:
        raise InvalidValue(f"invalid rate limit {rate_limit}: use 0 (no limit) or more requests")
    if rate_window_seconds is not None and not 1 <= rate_window_seconds <= MAX_INT:
        raise InvalidValue(f"invalid rate-limit window {rate_window_seconds}: use 1 second or more")


async def create_user(
    conn: asyncpg.Connection,
    *,
    username: str,
    rate_limit: int | None = None,
    rate_window_seconds: int | None = None,
) -> User:
    check_username(username)
    check_limits(rate_limit, rate_window_seconds)
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO users (username, rate_limit, rate_window_seconds)
                VALUES ($1, $2, $3) RETURNING {_USER_COLUMNS}""",
            username,
            rate_limit,
            rate_window_seconds,
        )
    except asyncpg.UniqueViolationError:
        raise UserExists(f"user {username} already exists") from None
    return User(**dict(row))


async def get_user(conn: asyncpg.Connection, *, username: str) -> User | None:
    row = await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE username = $1", username)
    return None if row is None else User(**dict(row))


async def list_users(conn: asyncpg.Connection) -> list[UserSummary]:
    """Every user with its active keys, last use, and requests and tokens of the last 24 h."""
    rows = await conn.fetch(
        """SELECT u.id, u.username, u.enabled, u.rate_limit, u.rate_window_seconds,
                  u.token_rate_limit, u.token_quota, u.quota_period, u.created_at,
                  (SELECT count(*) FROM api_keys k
                    WHERE k.user_id = u.id AND k.revoked_at IS NULL
                      AND (k.expires_at IS NULL OR k.expires_at > now())) AS active_keys,
                  (SELECT max(r.created_at) FROM llama_requests r
                    WHERE r.user_id = u.id) AS last_used,
                  recent.requests_24h, recent.tokens_24h
           FROM users u
           CROSS JOIN LATERAL (
               SELECT count(*) AS requests_24h,
                      coalesce(sum(coalesce(r.prompt_tokens, 0)
                                   + coalesce(r.completion_tokens, 0)), 0)::bigint AS tokens_24h
               FROM llama_requests r
               WHERE r.user_id = u.id AND r.created_at > now() - $1::interval
           ) AS recent
           ORDER BY u.username""",
        RECENT,
    )
    return [UserSummary(**dict(row)) for row in rows]


async def set_enabled(conn: asyncpg.Connection, *, username: str, enabled: bool) -> User:
    row = await conn.fetchrow(
        f"UPDATE users SET enabled = $2 WHERE username = $1 RETURNING {_USER_COLUMNS}",
        username,
        enabled,
    )
    return _found(row, username)


async def set_limits(
    conn: asyncpg.Connection,
    *,
    username: str,
    rate_limit: int | None,
    rate_window_seconds: int | None,
) -> User:
    """Override the gateway's rate limit for one user; None and None restore the default."""
    check_limits(rate_limit, rate_window_seconds)
    row = await conn.fetchrow(
        f"""UPDATE users SET rate_limit = $2, rate_window_seconds = $3
            WHERE username = $1 RETURNING {_USER_COLUMNS}""",
        username,
        rate_limit,
        rate_window_seconds,
    )
    return _found(row, username)


async def set_token_rate_limit(
    conn: asyncpg.Connection, *, username: str, token_rate_limit: int | None
) -> User:
    """Override the gateway's tokens per minute for one user (0: none); None restores it."""
    if token_rate_limit is not None and not 0 <= token_rate_limit <= MAX_INT:
        raise InvalidValue(
            f"invalid token rate limit {token_rate_limit}: use 0 (no limit) or more tokens"
        )
    row = await conn.fetchrow(
        f"UPDATE users SET token_rate_limit = $2 WHERE username = $1 RETURNING {_USER_COLUMNS}",
        username,
        token_rate_limit,
    )
    return _found(row, username)


async def set_quota(
    conn: asyncpg.Connection, *, username: str, token_quota: int | None, period: str | None
) -> User:
    """A user's own token quota: tokens per period (as parse_period reads it); 0 tokens
    and no period for none; None and None for the gateway's default."""
    if token_quota is not None and not 0 <= token_quota < 2**63:
        raise InvalidValue(f"invalid token quota {token_quota}: use 0 (no quota) or more tokens")
    if (period is None) != (not token_quota):
        raise InvalidValue("a token quota needs a period, and no quota has none")
    try:
        canonical = None if period is None else parse_period(period)
    except ValueError as exc:
        raise InvalidValue(str(exc)) from None
    row = await conn.fetchrow(
        f"""UPDATE users SET token_quota = $2, quota_period = $3
            WHERE username = $1 RETURNING {_USER_COLUMNS}""",
        username,
        token_quota,
        canonical,
    )
    return _found(row, username)


async def delete_user(conn: asyncpg.Connection, *, username: str) -> DeletedUser:
    """Delete a user and its keys; its request log rows stay, with user_id NULL."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """SELECT u.id,
                      (SELECT count(*) FROM api_keys k WHERE k.user_id = u.id) AS keys,
                      (SELECT count(*) FROM llama_requests r WHERE r.user_id = u.id) AS kept
               FROM users u WHERE u.username = $1 FOR UPDATE""",
            username,
        )
        if row is None:
            raise NoSuchUser(f"no such user: {username}")
        await conn.execute("DELETE FROM users WHERE id = $1", row["id"])
    return DeletedUser(username, row["keys"], row["kept"])


async def create_key(
    conn: asyncpg.Connection, *, username: str, expires_at: datetime | None = None
) -> NewKey:
    """A new key for the user; the caller shows NewKey.key once, the database keeps its hash."""
    for _attempt in range(3):  # a 40-bit key id may, very rarely, be taken already
        new = generate_key()
        inserted = await conn.fetchval(
            """INSERT INTO api_keys (key_id, key_hash, user_id, expires_at)
               SELECT $1, $2, id, $3 FROM users WHERE username = $4
               ON CONFLICT (key_id) DO NOTHING RETURNING id""",
            new.key_id,
            new.key_hash,
            expires_at,
            username,
        )
        if inserted is not None:
            return new
        if await get_user(conn, username=username) is None:
            raise NoSuchUser(f"no such user: {username}")
    raise RuntimeError("three generated key ids in a row were taken")


async def revoke_key(conn: asyncpg.Connection, *, key_id: str) -> bool:
    """Revoke a key at once; False if it was revoked already."""
    revoked = await conn.fetchval(
        "UPDATE api_keys SET revoked_at = now() "
        "WHERE key_id = $1 AND revoked_at IS NULL RETURNING true",
        key_id,
    )
    if revoked:
        return True
    if await conn.fetchval("SELECT true FROM api_keys WHERE key_id = $1", key_id):
        return False
    raise NoSuchKey(f"no such key: {key_id}")


KEEP: Final = "keep"  # rotate_key: the new key expires when the old one would have
NewExpiry = datetime | None | Literal["keep"]  # None: never


@dataclass(frozen=True)
class Rotated:
    new: NewKey
    username: str
    expires_at: datetime | None


async def rotate_key(
    conn: asyncpg.Connection, *, key_id: str, expires_at: NewExpiry = KEEP
) -> Rotated:
    """A new key for the same user, and the old one revoked, in one transaction.

    By default the new key expires when the old one would have: a key given for a
    month stays a key for that month. An expired key needs an expiry of its own (or
    None, never), since keeping it would make a key already expired.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            """SELECT u.username, k.revoked_at, k.expires_at, k.expires_at <= now() AS expired
               FROM api_keys k JOIN users u ON u.id = k.user_id
               WHERE k.key_id = $1 FOR UPDATE OF k""",
            key_id,
        )
        if row is None:
            raise NoSuchKey(f"no such key: {key_id}")
        if row["revoked_at"] is not None:
            raise InvalidValue(f"key {key_id} is revoked: give {row['username']} a new one")
        expiry: datetime | None
        if isinstance(expires_at, str):  # KEEP
            if row["expired"]:
                raise InvalidValue(
                    f"key {key_id} has expired: give the new key an expiry (e.g. "
                    "--expires-in 30d, or --expires-in never)"
                )
            expiry = row["expires_at"]
        else:
            expiry = expires_at
        new = await create_key(conn, username=row["username"], expires_at=expiry)
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", key_id)
    return Rotated(new, row["username"], expiry)


async def get_key(conn: asyncpg.Connection, *, key_id: str) -> Key | None:
    row = await conn.fetchrow(
        f"""SELECT {_KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id
            WHERE k.key_id = $1""",
        key_id,
    )
    return None if row is None else Key(**dict(row))


async def list_keys(conn: asyncpg.Connection, *, username: str | None = None) -> list[Key]:
    """Keys of one user or of all, by user and newest first, revoked and expired included."""
    rows = await conn.fetch(
        f"""SELECT {_KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id
            WHERE $1::text IS NULL OR u.username = $1
            ORDER BY u.username, k.created_at DESC, k.id DESC""",
        username,
    )
    if not rows and username is not None and await get_user(conn, username=username) is None:
        raise NoSuchUser(f"no such user: {username}")
    return [Key(**dict(row)) for row in rows]


def _found(row: asyncpg.Record | None, username: str) -> User:
    if row is None:
        raise NoSuchUser(f"no such user: {username}")
    return User(**dict(row))
