"""Stored responses in the store: kept per user (another's are not there for them), until
they expire by the database's clock, purged in batches, gone with their user (through
the CLI's delete-user too), and text jsonb refuses stored escaped."""

from __future__ import annotations

import json
import math
import subprocess
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from llamaserve.store import db, responses, users
from llamaserve.store.errors import InvalidValue
from tests.conftest import ROOT
from tests.pgfixtures import PgDatabase

pytestmark = pytest.mark.anyio

DAY = timedelta(days=1)
EXPIRED = timedelta(seconds=-1)
INPUT = [
    {"role": "user", "content": [{"type": "input_text", "text": "Hello, ünïcode 🦙"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
]
RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "output": [], "n": 1.5}


async def new_user(conn: asyncpg.Connection, username: str) -> int:
    return int((await users.create_user(conn, username=username)).id)


async def save(conn: Any, response_id: str, user_id: int, keep: timedelta = DAY, **kw: Any) -> None:
    await responses.save(
        conn,
        response_id=response_id,
        user_id=user_id,
        input_items=kw.get("input_items", INPUT),
        response=kw.get("response", RESPONSE),
        keep=keep,
    )


async def rows(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM llama_responses")
    return count


async def test_a_saved_response_loads_as_it_was_saved(pg_database: PgDatabase) -> None:
    pool = await db.create_pool(pg_database.settings, pg_database.layout)
    try:
        alice = await new_user(pool, "alice")
        await save(pool, "resp_1", alice)
        stored = await responses.load(pool, response_id="resp_1", user_id=alice)
        assert stored is not None
        assert (stored.response_id, stored.input_items, stored.response) == (
            "resp_1",
            INPUT,
            RESPONSE,
        )
        assert stored.created_at == await pool.fetchval(
            "SELECT created_at FROM llama_responses WHERE id = 'resp_1'"
        )
        assert await responses.load(pool, response_id="resp_2", user_id=alice) is None
    finally:
        await pool.close()


async def test_saving_an_id_again_replaces_it(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice")
    await save(pg_conn, "resp_1", alice)
    await save(pg_conn, "resp_1", alice, input_items=[], response={"id": "resp_1", "v": 2})
    stored = await responses.load(pg_conn, response_id="resp_1", user_id=alice)
    assert stored is not None and (stored.input_items, stored.response) == (
        [],
        {"id": "resp_1", "v": 2},
    )
    assert await rows(pg_conn) == 1


async def test_expiry_is_reckoned_by_the_database_clock(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice")
    await save(pg_conn, "resp_1", alice, keep=timedelta(days=30, seconds=1))
    kept = await pg_conn.fetchval(
        "SELECT expires_at - created_at FROM llama_responses WHERE id = 'resp_1'"
    )
    assert kept == timedelta(days=30, seconds=1)  # both the same transaction's now()


async def test_another_users_response_is_not_there_for_them(pg_conn: asyncpg.Connection) -> None:
    alice, bob = await new_user(pg_conn, "alice"), await new_user(pg_conn, "bob")
    await save(pg_conn, "resp_1", alice)
    assert await responses.load(pg_conn, response_id="resp_1", user_id=bob) is None
    assert await responses.delete(pg_conn, response_id="resp_1", user_id=bob) is False
    with pytest.raises(InvalidValue, match="resp_1 belongs to another user"):
        await save(pg_conn, "resp_1", bob, response={"id": "resp_1", "by": "bob"})
    stored = await responses.load(pg_conn, response_id="resp_1", user_id=alice)
    assert stored is not None and stored.response == RESPONSE


async def test_delete_deletes_once(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice")
    await save(pg_conn, "resp_1", alice)
    assert await responses.delete(pg_conn, response_id="resp_1", user_id=alice) is True
    assert await responses.delete(pg_conn, response_id="resp_1", user_id=alice) is False
    assert await responses.load(pg_conn, response_id="resp_1", user_id=alice) is None
    assert await rows(pg_conn) == 0


async def test_an_expired_response_is_gone_and_purged(pg_conn: asyncpg.Connection) -> None:
    alice, bob = await new_user(pg_conn, "alice"), await new_user(pg_conn, "bob")
    await save(pg_conn, "resp_old", alice, keep=EXPIRED)
    await save(pg_conn, "resp_new", alice)
    assert await responses.load(pg_conn, response_id="resp_old", user_id=alice) is None
    assert await responses.delete(pg_conn, response_id="resp_old", user_id=alice) is False
    assert await responses.purge_expired(pg_conn) == 1
    assert await responses.purge_expired(pg_conn) == 0
    assert await pg_conn.fetchval("SELECT array_agg(id) FROM llama_responses") == ["resp_new"]
    # An expired id is free again, whoever had it.
    await save(pg_conn, "resp_gone", alice, keep=EXPIRED)
    await save(pg_conn, "resp_gone", bob)
    assert await responses.load(pg_conn, response_id="resp_gone", user_id=bob) is not None


async def test_purge_goes_in_batches_until_none_is_left(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice")
    for i in range(7):
        await save(pg_conn, f"resp_{i}", alice, keep=EXPIRED)
    await save(pg_conn, "resp_live", alice)
    assert await responses.purge_expired(pg_conn, limit=3) == 7
    assert await rows(pg_conn) == 1
    with pytest.raises(ValueError, match="limit must be 1 or more"):
        await responses.purge_expired(pg_conn, limit=0)


async def test_deleting_a_user_deletes_their_responses(pg_conn: asyncpg.Connection) -> None:
    alice, bob = await new_user(pg_conn, "alice"), await new_user(pg_conn, "bob")
    await save(pg_conn, "resp_a1", alice)
    await save(pg_conn, "resp_a2", alice, keep=EXPIRED)
    await save(pg_conn, "resp_b", bob)
    await users.delete_user(pg_conn, username="alice")
    assert await pg_conn.fetchval("SELECT array_agg(id) FROM llama_responses") == ["resp_b"]
    # A request of a user deleted meanwhile: nothing to keep, and no error.
    await save(pg_conn, "resp_late", alice)
    assert await rows(pg_conn) == 1


def test_the_clis_delete_user_deletes_their_responses(pg_database: PgDatabase) -> None:
    cli = ROOT / "bin" / "user_management_cli.sh"
    made = subprocess.run(
        [str(cli), "create-user", "--username", "alice", "--json"],
        cwd=ROOT, env=pg_database.env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    alice = json.loads(made.stdout)["id"]
    pg_database.execute(
        "INSERT INTO llama_responses (id, user_id, expires_at, input, response)"
        " VALUES ('resp_1', $1, now() + interval '1 day', '[]', '{}')",
        alice,
    )
    subprocess.run(
        [str(cli), "delete-user", "--username", "alice", "--yes"],
        cwd=ROOT, env=pg_database.env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    pg_database.execute(
        "DO $$ BEGIN IF EXISTS (SELECT FROM llama_responses) THEN"
        " RAISE 'a response outlived its user'; END IF; END $$"
    )


async def test_text_jsonb_refuses_is_stored_escaped(pg_conn: asyncpg.Connection) -> None:
    alice = await new_user(pg_conn, "alice")
    given = [{"text": "a\x00b", "key\x00": "\ud800 lone", "kept": "\\u0000 and \U0001f999"}]
    await save(pg_conn, "resp_1", alice, input_items=given, response={"nul": "\x00"})
    stored = await responses.load(pg_conn, response_id="resp_1", user_id=alice)
    assert stored is not None
    assert stored.input_items == [
        {"text": "a\\x00b", "key\\x00": "\\ud800 lone", "kept": "\\u0000 and \U0001f999"}
    ]
    assert stored.response == {"nul": "\\x00"}


def test_usual_json_is_stored_as_it_is() -> None:
    assert responses.to_json(INPUT) == json.dumps(INPUT, ensure_ascii=False, separators=(",", ":"))
    assert responses.to_json(["\\u0000"]) == '["\\\\u0000"]'  # a backslash and "u0000"


@pytest.mark.parametrize("value", [{"x": math.nan}, {"x": math.inf}, {"x": object()}])
async def test_what_json_cannot_hold_is_refused(pg_conn: asyncpg.Connection, value: Any) -> None:
    alice = await new_user(pg_conn, "alice")
    with pytest.raises(InvalidValue, match="cannot store as JSON"):
        await save(pg_conn, "resp_1", alice, response=value)
    assert await rows(pg_conn) == 0


@pytest.mark.parametrize("response_id", ["resp_\x00", "resp_\udc80"])
async def test_an_id_postgresql_cannot_hold_is_never_found(
    pg_conn: asyncpg.Connection, response_id: str
) -> None:
    alice = await new_user(pg_conn, "alice")
    assert await responses.load(pg_conn, response_id=response_id, user_id=alice) is None
    assert await responses.delete(pg_conn, response_id=response_id, user_id=alice) is False
    with pytest.raises(InvalidValue, match="cannot store a response under the id"):
        await save(pg_conn, response_id, alice)
