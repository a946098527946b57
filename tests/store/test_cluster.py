"""The private cluster: initialised once, started, stopped and restarted with its data; a
socket only we can use and no TCP port; a one-line refusal when it cannot be run."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamaserve.config import ConfigError, Layout
from llamaserve.ops import cluster
from llamaserve.store import db
from tests.pgfixtures import TEMPLATE, PgCluster

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def spare_root() -> Iterator[Path]:
    """A directory the `postgres` user may enter (pytest's tmp_path is ours alone)."""
    root = Path(tempfile.mkdtemp(prefix="llamaserve-pg-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def layout_in(root: Path) -> Layout:
    return Layout(root, root / "runtime", root / "models")


async def fetch_value(pg: PgCluster, layout: Layout, database: str, sql: str) -> object:
    conn = await db.connect(pg.settings(database), layout)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_the_session_cluster(pg_cluster: PgCluster) -> None:
    layout = pg_cluster.layout
    assert (cluster.status(layout) or "").startswith("running, pid ")
    assert stat.S_IMODE(db.socket_dir(layout).stat().st_mode) == 0o700
    assert asyncio.run(fetch_value(pg_cluster, layout, TEMPLATE, "SHOW listen_addresses")) == ""
    if AS_ROOT:  # PostgreSQL refuses root: the cluster is the postgres user's
        owner = db.data_dir(layout).stat().st_uid
        assert owner == pwd.getpwnam("postgres").pw_uid


def test_ensure_running_is_fast_when_running(pg_cluster: PgCluster) -> None:
    began = time.monotonic()
    cluster.ensure_running(pg_cluster.settings(TEMPLATE), pg_cluster.layout)
    assert time.monotonic() - began < 1.0


def test_lifecycle_keeps_the_data(pg_cluster: PgCluster, spare_root: Path) -> None:
    layout = layout_in(spare_root)
    settings = pg_cluster.settings("lifecycle")
    assert cluster.status(layout) is None
    assert cluster.stop(layout, timeout=5) is False
    try:
        cluster.ensure_running(settings, layout)  # initdb, start, CREATE DATABASE lifecycle
        sql = "CREATE TABLE kept AS SELECT 42 AS answer"
        asyncio.run(fetch_value(pg_cluster, layout, "lifecycle", sql))
        assert cluster.stop(layout, timeout=5) is True
        assert cluster.status(layout) is None
        cluster.ensure_running(settings, layout)
        answer = asyncio.run(
            fetch_value(pg_cluster, layout, "lifecycle", "SELECT answer FROM kept")
        )
        assert answer == 42
    finally:
        cluster.stop(layout, timeout=5)


def test_missing_server_programs_name_the_three_ways_out(
    pg_cluster: PgCluster, spare_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "_candidate_dirs", list)
    monkeypatch.setattr(cluster, "DEBIAN_VERSIONS", spare_root / "none")
    with pytest.raises(ConfigError) as caught:
        cluster.ensure_running(pg_cluster.settings("x"), layout_in(spare_root))
    message = str(caught.value)
    assert "\n" not in message
    for way_out in ("apt-get install postgresql", "docker compose up -d postgres"):
        assert way_out in message
    assert "POSTGRES_AUTH_HOST in .env" in message


def test_a_socket_path_too_long_for_unix(pg_cluster: PgCluster, spare_root: Path) -> None:
    deep = spare_root / ("d" * 100)
    deep.mkdir()
    with pytest.raises(ConfigError, match="longer than Unix allows"):
        cluster.ensure_running(pg_cluster.settings("x"), layout_in(deep))


@pytest.mark.skipif(not AS_ROOT, reason="only root hands the cluster to the postgres user")
def test_a_directory_the_postgres_user_cannot_enter(pg_cluster: PgCluster, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"runs as user postgres .* cannot enter .*chmod o\+x"):
        cluster.ensure_running(pg_cluster.settings("x"), layout_in(private))


def test_the_log_is_not_for_others(pg_cluster: PgCluster, spare_root: Path) -> None:
    """The logs directory and postgres.log as earlier versions left them (755 and 644) are
    tightened, and the server, the postgres user when we are root, still writes its log."""
    layout = layout_in(spare_root)
    log = cluster.log_file(layout)
    log.parent.mkdir(parents=True)
    log.parent.chmod(0o755)
    log.write_text("earlier\n")
    log.chmod(0o644)
    try:
        cluster.ensure_running(pg_cluster.settings("logs"), layout)
        assert stat.S_IMODE(log.parent.stat().st_mode) == 0o750  # no more for its group
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        if AS_ROOT:  # the directory's group is the server's, so that it can reach its log
            postgres = pwd.getpwnam("postgres")
            assert log.parent.stat().st_gid == postgres.pw_gid
            assert log.stat().st_uid == postgres.pw_uid
        assert cluster.stop(layout, timeout=5) is True
        assert "shut down" in log.read_text()  # written by the server to the end
    finally:
        cluster.stop(layout, timeout=5)
