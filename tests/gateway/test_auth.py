"""Every way a caller can be refused: status, envelope, and a log row for each; a refused
key tells nothing of whether its key id exists. In process, on a real database, with the
mock engine: none of it needs the model."""

from __future__ import annotations

import asyncio
import json
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
from tests.gateway.harness import Site
from tests.gateway.helpers import extra_gateway
from tests.pgfixtures import PgDatabase


async def call(gateway: httpx.AsyncClient, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return await gateway.get("/v1/models", headers=headers)


def get(url: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})


async def refused(site: Site, response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    row = await site.logged(response.headers["x-request-id"])
    assert row["status"] == status and row["outcome"] == "rejected"
    assert row["error"] == error["message"]


@pytest.fixture
async def gateway(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with site.gateway() as client:
        yield client


@pytest.mark.anyio
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
async def test_bad_credentials_are_401(
    site: Site, gateway: httpx.AsyncClient, authorization: str | None, code: str
) -> None:
    await refused(site, await call(gateway, authorization), 401, code)


@pytest.mark.anyio
async def test_the_engine_key_is_refused(site: Site, gateway: httpx.AsyncClient) -> None:
    await refused(site, await call(gateway, f"Bearer {site.engine_key}"), 401, "invalid_api_key")


@pytest.mark.anyio
async def test_a_tampered_secret_is_refused(site: Site, gateway: httpx.AsyncClient) -> None:
    alice = site.create_user("alice-auth")
    tampered = alice[:-1] + ("A" if alice[-1] != "A" else "B")
    await refused(site, await call(gateway, f"Bearer {tampered}"), 401, "invalid_api_key")


@pytest.mark.anyio
async def test_each_key_acts_as_its_own_user(site: Site, gateway: httpx.AsyncClient) -> None:
    bob, carol = site.create_user("bob-auth"), site.create_user("carol-auth")
    for name, key in (("bob-auth", bob), ("carol-auth", carol)):
        response = await call(gateway, f"Bearer {key}")
        assert response.status_code == 200
        assert (await site.logged(response.headers["x-request-id"]))["username"] == name


@pytest.mark.anyio
async def test_revoked_key_is_401_at_once(site: Site, gateway: httpx.AsyncClient) -> None:
    key = site.create_user("dave-auth")
    assert (await call(gateway, f"Bearer {key}")).status_code == 200
    key_id = key.split("_")[1]
    assert site.cli("revoke-key", "--key-id", key_id).returncode == 0
    await refused(site, await call(gateway, f"Bearer {key}"), 401, "key_revoked")


@pytest.mark.anyio
async def test_rotated_away_key_is_401_and_the_new_one_works(
    site: Site, gateway: httpx.AsyncClient
) -> None:
    key = site.create_user("erin-auth")
    assert (await call(gateway, f"Bearer {key}")).status_code == 200
    rotated = site.cli("rotate-key", "--key-id", key.split("_")[1], "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_key = json.loads(rotated.stdout)["key"]
    await refused(site, await call(gateway, f"Bearer {key}"), 401, "key_revoked")
    assert (await call(gateway, f"Bearer {new_key}")).status_code == 200


@pytest.mark.anyio
async def test_disabled_user_is_403_and_enabled_again_200(
    site: Site, gateway: httpx.AsyncClient
) -> None:
    key = site.create_user("frank-auth")
    assert site.cli("disable-user", "--username", "frank-auth").returncode == 0
    await refused(site, await call(gateway, f"Bearer {key}"), 403, "user_disabled")
    assert site.cli("enable-user", "--username", "frank-auth").returncode == 0
    assert (await call(gateway, f"Bearer {key}")).status_code == 200


def test_a_key_made_after_its_id_was_refused_works_at_once(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown key ids are not remembered: a key made a moment ago works at once on every
    gateway, also on those that refused its id just before."""
    site.create_user("gina-auth")
    new = keys.generate_key()
    with extra_gateway(site) as first, extra_gateway(site) as second:
        for url in (first, second):
            response = get(url, new.key)
            asyncio.run(refused(site, response, 401, "invalid_api_key"))
        monkeypatch.setattr(users, "generate_key", lambda: new)  # the key of a known id

        async def create() -> None:
            conn = await site.connect()
            try:
                assert await users.create_key(conn, username="gina-auth") == new
            finally:
                await conn.close()

        asyncio.run(create())
        for url in (first, second):
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
