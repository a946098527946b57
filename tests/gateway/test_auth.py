"""Every way a caller can be refused: status, envelope, and a log row for each; a refused
key tells nothing of whether its key id exists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from llamaserve.config import new_engine_key
from llamaserve.errors import APIError, AuthenticationFailed
from llamaserve.gateway import db_status
from llamaserve.gateway.auth import Authenticator
from llamaserve.store import db, keys, users
from tests.gateway.conftest import Stack
from tests.gateway.helpers import extra_gateway
from tests.pgfixtures import PgDatabase


def call(stack: Stack, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.get(f"{stack.gateway_url}/v1/models", headers=headers)


def get(url: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})


def refused(stack: Stack, response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    row = stack.row(response.headers["x-request-id"])
    assert row["status"] == status and row["outcome"] == "rejected"
    assert row["error"] == error["message"]


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization_header"),
        ("Bearer", "invalid_authorization_header"),
        ("Bearer lsk_0123456789_" + "A" * 43, "invalid_api_key"),
        ("Bearer sk-not-ours", "invalid_api_key"),
    ],
    ids=["no-header", "not-bearer", "empty-bearer", "unknown-key", "foreign-key"],
)
def test_bad_credentials_are_401(stack: Stack, authorization: str | None, code: str) -> None:
    refused(stack, call(stack, authorization), 401, code)


def test_the_engine_key_is_refused(stack: Stack) -> None:
    refused(stack, call(stack, f"Bearer {stack.engine_key}"), 401, "invalid_api_key")


def test_a_tampered_secret_is_refused(stack: Stack, alice: str) -> None:
    tampered = alice[:-1] + ("A" if alice[-1] != "A" else "B")
    refused(stack, call(stack, f"Bearer {tampered}"), 401, "invalid_api_key")


def test_each_key_acts_as_its_own_user(stack: Stack) -> None:
    bob, carol = stack.create_user("bob-auth"), stack.create_user("carol-auth")
    for name, key in (("bob-auth", bob), ("carol-auth", carol)):
        response = call(stack, f"Bearer {key}")
        assert response.status_code == 200
        assert stack.row(response.headers["x-request-id"])["username"] == name


def test_revoked_key_is_401_at_once(stack: Stack) -> None:
    key = stack.create_user("dave-auth")
    assert call(stack, f"Bearer {key}").status_code == 200
    key_id = key.split("_")[1]
    assert stack.cli("revoke-key", "--key-id", key_id).returncode == 0
    refused(stack, call(stack, f"Bearer {key}"), 401, "key_revoked")


def test_rotated_away_key_is_401_and_the_new_one_works(stack: Stack) -> None:
    import json

    key = stack.create_user("erin-auth")
    assert call(stack, f"Bearer {key}").status_code == 200
    rotated = stack.cli("rotate-key", "--key-id", key.split("_")[1], "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_key = json.loads(rotated.stdout)["key"]
    refused(stack, call(stack, f"Bearer {key}"), 401, "key_revoked")
    assert call(stack, f"Bearer {new_key}").status_code == 200


def test_disabled_user_is_403_and_enabled_again_200(stack: Stack) -> None:
    key = stack.create_user("frank-auth")
    assert stack.cli("disable-user", "--username", "frank-auth").returncode == 0
    refused(stack, call(stack, f"Bearer {key}"), 403, "user_disabled")
    assert stack.cli("enable-user", "--username", "frank-auth").returncode == 0
    assert call(stack, f"Bearer {key}").status_code == 200


def test_a_key_made_after_its_id_was_refused_works_at_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown key ids are not remembered: a key made a moment ago works at once on every
    gateway, also on those that refused its id just before."""
    stack.create_user("gina-auth")
    new = keys.generate_key()
    with extra_gateway(stack) as second:
        for url in (stack.gateway_url, second):
            refused(stack, get(url, new.key), 401, "invalid_api_key")
        monkeypatch.setattr(users, "generate_key", lambda: new)  # the key of a known id

        async def create() -> None:
            conn = await stack.connect()
            try:
                assert await users.create_key(conn, username="gina-auth") == new
            finally:
                await conn.close()

        asyncio.run(create())
        for url in (stack.gateway_url, second):
            assert get(url, new.key).status_code == 200


@pytest.fixture
async def authenticator(
    pg_database: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Authenticator, asyncpg.Pool]]:
    """An Authenticator on a real database (its pool, to close), with a status of its own."""
    monkeypatch.setattr(db_status, "status", db_status.DatabaseStatus())
    pool = await db.create_pool(pg_database.settings, pg_database.layout)
    try:
        yield Authenticator(pool, SecretStr(new_engine_key())), pool
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_a_wrong_secret_is_refused_as_an_unknown_key_id_is(
    authenticator: tuple[Authenticator, asyncpg.Pool],
) -> None:
    """A known key id with a wrong secret is never refused from the cache: it asks the
    database as an unknown id does (timing must not tell which ids exist). With the
    database gone, both get the same 503; a right key still passes from the cache."""
    auth, pool = authenticator
    async with pool.acquire() as conn:
        await users.create_user(conn, username="hana")
        new = await users.create_key(conn, username="hana")
    assert await auth.authenticate(f"Bearer {new.key}".encode()) == new.key_id  # now cached
    wrong = new.key[:-1] + ("A" if new.key[-1] != "A" else "B")
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(f"Bearer {wrong}".encode())

    await pool.close()
    answers = []
    for key in (wrong, keys.generate_key().key):
        with pytest.raises(APIError) as caught:
            await auth.authenticate(f"Bearer {key}".encode())
        answers.append((caught.value.status, caught.value.body(), caught.value.headers))
    assert answers[0] == answers[1] and answers[0][0] == 503, answers
    assert await auth.authenticate(f"Bearer {new.key}".encode()) == new.key_id
