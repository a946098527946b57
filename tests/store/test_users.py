"""Users and keys in the store: validation, duplicates, unknown names, limits, revoking and
rotating keys, deleting a user (its log rows stay), and no key ever stored in plain text."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from llamaserve.store import keys, users
from llamaserve.store.errors import InvalidValue, NoSuchKey, NoSuchUser, UserExists
from tests.pgfixtures import PgDatabase, log_request

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("name", ["a", "0", "alice", "a.b-c_d", "x" * 63])
async def test_valid_usernames(pg_conn: asyncpg.Connection, name: str) -> None:
    user = await users.create_user(pg_conn, username=name)
    assert user.username == name and user.enabled
    assert (user.rate_limit, user.rate_window_seconds) == (None, None)
    assert await users.get_user(pg_conn, username=name) == user


@pytest.mark.parametrize("name", ["", "Alice", "-a", ".a", "_a", "a b", "a/b", "é", "x" * 64])
async def test_invalid_usernames(pg_conn: asyncpg.Connection, name: str) -> None:
    with pytest.raises(InvalidValue, match="invalid username"):
        await users.create_user(pg_conn, username=name)


async def test_a_duplicate_user(pg_conn: asyncpg.Connection) -> None:
    await users.create_user(pg_conn, username="alice")
    with pytest.raises(UserExists, match="user alice already exists"):
        await users.create_user(pg_conn, username="alice")


async def test_unknown_users(pg_conn: asyncpg.Connection) -> None:
    assert await users.get_user(pg_conn, username="nobody") is None
    for call in (
        users.set_enabled(pg_conn, username="nobody", enabled=False),
        users.set_limits(pg_conn, username="nobody", rate_limit=1, rate_window_seconds=None),
        users.delete_user(pg_conn, username="nobody"),
        users.create_key(pg_conn, username="nobody"),
        users.list_keys(pg_conn, username="nobody"),
    ):
        with pytest.raises(NoSuchUser, match="no such user: nobody"):
            await call


async def test_limits(pg_conn: asyncpg.Connection) -> None:
    user = await users.create_user(pg_conn, username="alice", rate_limit=5, rate_window_seconds=10)
    assert (user.rate_limit, user.rate_window_seconds) == (5, 10)
    user = await users.set_limits(pg_conn, username="alice", rate_limit=0, rate_window_seconds=None)
    assert (user.rate_limit, user.rate_window_seconds) == (0, None)
    user = await users.set_limits(
        pg_conn, username="alice", rate_limit=None, rate_window_seconds=None
    )
    assert (user.rate_limit, user.rate_window_seconds) == (None, None)
    for rate, window in ((-1, None), (1, 0), (2**31, None)):
        with pytest.raises(InvalidValue):
            await users.set_limits(
                pg_conn, username="alice", rate_limit=rate, rate_window_seconds=window
            )


async def test_disable_and_enable(pg_conn: asyncpg.Connection) -> None:
    await users.create_user(pg_conn, username="alice")
    assert not (await users.set_enabled(pg_conn, username="alice", enabled=False)).enabled
    assert (await users.set_enabled(pg_conn, username="alice", enabled=True)).enabled


async def test_a_new_key_is_stored_as_its_hash(pg_conn: asyncpg.Connection) -> None:
    await users.create_user(pg_conn, username="alice")
    new = await users.create_key(pg_conn, username="alice")
    assert keys.key_id_of(new.key) == new.key_id
    stored = await pg_conn.fetchval("SELECT key_hash FROM api_keys WHERE key_id = $1", new.key_id)
    assert stored == keys.hash_key(new.key)
    [listed] = await users.list_keys(pg_conn, username="alice")
    assert (listed.key_id, listed.username, listed.state) == (new.key_id, "alice", "active")


async def test_revoke_a_key(pg_conn: asyncpg.Connection) -> None:
    await users.create_user(pg_conn, username="alice")
    new = await users.create_key(pg_conn, username="alice")
    assert await users.revoke_key(pg_conn, key_id=new.key_id) is True
    assert await users.revoke_key(pg_conn, key_id=new.key_id) is False  # already revoked
    key = await users.get_key(pg_conn, key_id=new.key_id)
    assert key is not None and key.state == "revoked" and key.revoked_at is not None
    with pytest.raises(NoSuchKey, match="no such key: 0000000000"):
        await users.revoke_key(pg_conn, key_id="0000000000")


async def test_rotate_a_key(pg_database: PgDatabase, pg_conn: asyncpg.Connection) -> None:
    await users.create_user(pg_conn, username="alice")
    old = await users.create_key(pg_conn, username="alice")
    new = (await users.rotate_key(pg_conn, key_id=old.key_id)).new
    assert new.key_id != old.key_id
    other = await pg_database.connect()  # what the gateway sees, at once
    try:
        states = await other.fetch("SELECT key_id, revoked_at IS NULL AS active FROM api_keys")
    finally:
        await other.close()
    assert {(r["key_id"], r["active"]) for r in states} == {(old.key_id, False), (new.key_id, True)}
    with pytest.raises(InvalidValue, match=f"key {old.key_id} is revoked"):
        await users.rotate_key(pg_conn, key_id=old.key_id)
    with pytest.raises(NoSuchKey):
        await users.rotate_key(pg_conn, key_id="0000000000")


async def test_a_rotated_key_expires_when_the_old_one_would_have(
    pg_conn: asyncpg.Connection,
) -> None:
    await users.create_user(pg_conn, username="alice")
    month = datetime.now(UTC) + timedelta(days=30)
    old = await users.create_key(pg_conn, username="alice", expires_at=month)
    rotated = await users.rotate_key(pg_conn, key_id=old.key_id)
    key = await users.get_key(pg_conn, key_id=rotated.new.key_id)
    assert key is not None and key.expires_at == rotated.expires_at == month
    # Unless told otherwise: another expiry, or none.
    later = month + timedelta(days=30)
    again = await users.rotate_key(pg_conn, key_id=rotated.new.key_id, expires_at=later)
    never = await users.rotate_key(pg_conn, key_id=again.new.key_id, expires_at=None)
    assert (again.expires_at, never.expires_at) == (later, None)
    key = await users.get_key(pg_conn, key_id=never.new.key_id)
    assert key is not None and key.expires_at is None

    # An expired key has no expiry to keep: its rotation needs one of its own.
    gone = await users.create_key(
        pg_conn, username="alice", expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    with pytest.raises(InvalidValue, match=f"key {gone.key_id} has expired"):
        await users.rotate_key(pg_conn, key_id=gone.key_id)
    renewed = await users.rotate_key(pg_conn, key_id=gone.key_id, expires_at=month)
    key = await users.get_key(pg_conn, key_id=renewed.new.key_id)
    assert key is not None and key.state == "active"


async def test_two_concurrent_rotations_of_one_key_make_one_new_key(
    pg_database: PgDatabase, pg_conn: asyncpg.Connection
) -> None:
    await users.create_user(pg_conn, username="alice")
    old = await users.create_key(pg_conn, username="alice")
    conns = [await pg_database.connect() for _ in range(2)]
    try:
        results = await asyncio.gather(
            *(users.rotate_key(conn, key_id=old.key_id) for conn in conns), return_exceptions=True
        )
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(type(r).__name__ for r in results) == ["InvalidValue", "Rotated"]
    states = [k.state for k in await users.list_keys(pg_conn, username="alice")]
    assert sorted(states) == ["active", "revoked"]


async def test_an_expired_key_is_not_active(pg_conn: asyncpg.Connection) -> None:
    await users.create_user(pg_conn, username="alice")
    past = datetime.now(UTC) - timedelta(minutes=1)
    expired = await users.create_key(pg_conn, username="alice", expires_at=past)
    await users.create_key(pg_conn, username="alice", expires_at=past + timedelta(days=1))
    key = await users.get_key(pg_conn, key_id=expired.key_id)
    assert key is not None and key.state == "expired"
    [summary] = await users.list_users(pg_conn)
    assert summary.active_keys == 1


async def test_list_users_counts_keys_and_recent_use(pg_conn: asyncpg.Connection) -> None:
    alice = await users.create_user(pg_conn, username="alice")
    await users.create_user(pg_conn, username="bob", rate_limit=3)
    for _ in range(2):
        await users.create_key(pg_conn, username="alice")
    revoked = await users.create_key(pg_conn, username="alice")
    await users.revoke_key(pg_conn, key_id=revoked.key_id)
    tokens = {"prompt_tokens": 10, "completion_tokens": 5}
    await log_request(pg_conn, user_id=alice.id, username="alice", **tokens)
    await log_request(pg_conn, user_id=alice.id, username="alice", status=429, outcome="rejected")
    await log_request(pg_conn, user_id=alice.id, username="alice", ago=timedelta(days=2), **tokens)

    by_name = {s.username: s for s in await users.list_users(pg_conn)}
    assert list(by_name) == ["alice", "bob"]
    alice_summary, bob_summary = by_name["alice"], by_name["bob"]
    assert (alice_summary.active_keys, alice_summary.requests_24h) == (2, 2)
    assert alice_summary.tokens_24h == 15 and isinstance(alice_summary.tokens_24h, int)
    assert alice_summary.last_used is not None
    assert datetime.now(UTC) - alice_summary.last_used < timedelta(minutes=1)
    assert (bob_summary.active_keys, bob_summary.requests_24h, bob_summary.tokens_24h) == (0, 0, 0)
    assert bob_summary.last_used is None and bob_summary.rate_limit == 3


async def test_delete_user_keeps_its_log_rows(pg_conn: asyncpg.Connection) -> None:
    alice = await users.create_user(pg_conn, username="alice")
    new = await users.create_key(pg_conn, username="alice")
    await pg_conn.execute("INSERT INTO rate_limit_state VALUES ($1, now())", alice.id)
    for _ in range(3):
        await log_request(pg_conn, user_id=alice.id, username="alice", key_id=new.key_id)

    deleted = await users.delete_user(pg_conn, username="alice")

    assert (deleted.username, deleted.keys, deleted.requests_kept) == ("alice", 1, 3)
    assert await users.get_user(pg_conn, username="alice") is None
    assert await pg_conn.fetchval("SELECT count(*) FROM api_keys") == 0
    assert await pg_conn.fetchval("SELECT count(*) FROM rate_limit_state") == 0
    rows = await pg_conn.fetch("SELECT user_id, username, key_id FROM llama_requests")
    assert [tuple(r) for r in rows] == [(None, "alice", new.key_id)] * 3


async def test_no_table_ever_holds_a_key_in_plain_text(pg_database: PgDatabase) -> None:
    """Every column of every table, cast to text, searched for each key that was made."""
    conn = await pg_database.connect()
    try:
        await users.create_user(conn, username="alice")
        made = [await users.create_key(conn, username="alice")]
        made.append((await users.rotate_key(conn, key_id=made[0].key_id)).new)
        made.append(await users.create_key(conn, username="alice"))
        await users.revoke_key(conn, key_id=made[-1].key_id)
        tables = await conn.fetch(
            """SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) AS name
               FROM information_schema.tables
               WHERE table_type = 'BASE TABLE'
                 AND table_schema NOT IN ('pg_catalog', 'information_schema')"""
        )
        assert {"public.users", "public.api_keys"} <= {t["name"] for t in tables}
        dumped = [
            row[0] for t in tables for row in await conn.fetch(f"SELECT t::text FROM {t['name']} t")
        ]
    finally:
        await conn.close()
    assert any(made[0].key_id in text for text in dumped)  # the search does see the keys' rows
    for new in made:
        secret = new.key.split("_", 2)[2]  # lsk_<key id>_<secret>
        assert not [text for text in dumped if new.key in text or secret in text]
    server_log = pg_database.cluster.layout.logs / "postgres.log"
    assert all(new.key not in server_log.read_text() for new in made)
