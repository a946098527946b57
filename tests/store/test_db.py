"""Connections: arguments from POSTGRES_AUTH_*, and one clear line for every way to fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaserve.config import Layout, Settings
from llamaserve.store import db
from llamaserve.store.errors import DatabaseUnavailable
from tests.conftest import free_port
from tests.pgfixtures import PgCluster, PgDatabase

PASSWORD = "s3cret-Passw0rd"


def server_settings(**values: object) -> Settings:
    """Settings of a server at 127.0.0.1, whatever the environment of the tests holds."""
    values = {
        "postgres_auth_host": "127.0.0.1",
        "postgres_auth_port": 5432,
        "postgres_auth_db": "llamaserve",
        "postgres_auth_user": "llamaserve",
        "postgres_auth_password": PASSWORD,
        "postgres_auth_sslmode": "prefer",
        **values,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_connect_kwargs_for_a_server(tmp_path: Path) -> None:
    layout = Layout(tmp_path, tmp_path / "runtime", tmp_path / "models")
    settings = server_settings(postgres_auth_port=6543, postgres_auth_sslmode="require")
    assert db.connect_kwargs(settings, layout) == {
        "host": "127.0.0.1",
        "port": 6543,
        "user": "llamaserve",
        "database": "llamaserve",
        "ssl": "require",
        "password": PASSWORD,
    }
    no_password = server_settings(postgres_auth_password="")
    assert "password" not in db.connect_kwargs(no_password, layout)
    assert PASSWORD not in db.describe(settings, layout)


def test_connect_kwargs_for_the_private_cluster(tmp_path: Path) -> None:
    layout = Layout(tmp_path, tmp_path / "runtime", tmp_path / "models")
    settings = server_settings(postgres_auth_host="")
    assert db.is_private(settings)
    assert db.connect_kwargs(settings, layout) == {
        "host": str(tmp_path / "runtime" / "pg"),
        "port": 5432,
        "user": "llamaserve",
        "database": "llamaserve",
        "ssl": False,
    }


@pytest.mark.anyio
async def test_a_pool(pg_database: PgDatabase) -> None:
    pool = await db.create_pool(pg_database.settings, pg_database.layout, min_size=1, max_size=2)
    try:
        assert await pool.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_nothing_listens(tmp_path: Path) -> None:
    port = free_port()
    settings = server_settings(postgres_auth_port=port)
    layout = Layout(tmp_path, tmp_path / "runtime", tmp_path / "models")
    with pytest.raises(DatabaseUnavailable) as caught:
        await db.connect(settings, layout)
    message = str(caught.value)
    assert f"cannot reach PostgreSQL at llamaserve@127.0.0.1:{port}/llamaserve" in message
    assert "POSTGRES_AUTH_HOST" in message and PASSWORD not in message
    with pytest.raises(DatabaseUnavailable, match="cannot reach"):
        await db.create_pool(settings, layout)


@pytest.mark.anyio
async def test_the_private_cluster_is_not_running(tmp_path: Path) -> None:
    layout = Layout(tmp_path, tmp_path / "runtime", tmp_path / "models")
    settings = server_settings(postgres_auth_host="")
    with pytest.raises(DatabaseUnavailable, match=r"private PostgreSQL cluster .* not running"):
        await db.connect(settings, layout)


@pytest.mark.anyio
async def test_an_unknown_database(pg_cluster: PgCluster) -> None:
    with pytest.raises(DatabaseUnavailable, match="database no_such_db does not exist"):
        await db.connect(pg_cluster.settings("no_such_db"), pg_cluster.layout)


@pytest.mark.anyio
async def test_an_unknown_user(pg_cluster: PgCluster) -> None:
    settings = pg_cluster.settings("postgres", postgres_auth_user="nobody")
    with pytest.raises(DatabaseUnavailable, match="refused user nobody"):
        await db.connect(settings, pg_cluster.layout)
