"""The private PostgreSQL cluster under runtime/, used when .env names no database host.

Data in `runtime/pgdata`, the server's socket in `runtime/pg` (mode 0700) and no TCP
listener at all, log in `runtime/logs/postgres.log`. Clients connect over the socket as
POSTGRES_AUTH_USER with trust authentication: the socket directory's permissions are the
access control, so POSTGRES_AUTH_PORT and POSTGRES_AUTH_PASSWORD do not apply here.

PostgreSQL refuses to run as root. When we are root, the cluster belongs to and runs as
the `postgres` system user (or whoever already owns the data directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from llamaserve import logs
from llamaserve.config import ConfigError, Layout, Settings
from llamaserve.store.db import PORT, connect_kwargs, data_dir, is_private, socket_dir

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
DEBIAN_VERSIONS = Path("/usr/lib/postgresql")
START_TIMEOUT = 60
CONFIG_FILE = "llamaserve.conf"
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
NOT_INSTALLED = (
    "PostgreSQL's server programs (initdb, pg_ctl, postgres) are not installed, and .env "
    "names no POSTGRES_AUTH_HOST for Llamaserve to use instead: install them "
    "(apt-get install postgresql), or run `docker compose up -d postgres` and set "
    "POSTGRES_AUTH_HOST=127.0.0.1 and a password in .env, or point POSTGRES_AUTH_HOST "
    "in .env at a PostgreSQL server"
)


def log_file(layout: Layout) -> Path:
    return layout.logs / "postgres.log"


def status(layout: Layout) -> str | None:
    """'running, pid N, ...' when the private cluster runs, else None."""
    pid = _postmaster_pid(layout)
    return None if pid is None else f"running, pid {pid}, socket {socket_dir(layout)}"


def ensure_running(settings: Settings, layout: Layout, *, out: TextIO | None = None) -> None:
    """Initialise (on first use) and start the private cluster; create the database.

    A no-op when .env names a host. Idempotent, and fast when the cluster already runs.
    Blocking: from async code, call it in a thread. Raises ConfigError with one line.
    """
    if not is_private(settings):
        return
    with _lock(layout):
        if _postmaster_pid(layout) is None:
            _start(settings, layout, out)
        asyncio.run(_create_database(settings, layout))


def stop(layout: Layout, timeout: float) -> bool:
    """Stop the private cluster: a fast shutdown, then an immediate one after `timeout`.

    True if it was running (and is now stopped), False if it was not running.
    """
    if _postmaster_pid(layout) is None:
        return False
    pg_ctl = str(server_bindir(_data_version(layout)) / "pg_ctl")
    owner = _server_owner(layout)
    data = str(data_dir(layout))
    seconds = str(max(1, round(timeout)))
    if _run([pg_ctl, "stop", "-D", data, "-m", "fast", "-w", "-t", seconds], owner).returncode:
        _run([pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "10"], owner)
    pid = _postmaster_pid(layout)
    if pid is not None:
        raise ConfigError(
            f"the private PostgreSQL cluster (pid {pid}) did not stop; see {log_file(layout)}"
        )
    return True


def server_bindir(version: str | None = None) -> Path:
    """The directory of PostgreSQL's server programs, preferring major `version`."""
    candidates = _candidate_dirs()
    if version:
        candidates.insert(0, DEBIAN_VERSIONS / version / "bin")
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in SERVER_PROGRAMS):
            return directory
    raise ConfigError(NOT_INSTALLED)


def _candidate_dirs() -> list[Path]:
    """pg_config's bindir, then pg_ctl's directory on PATH, then Debian's, newest first."""
    dirs: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            dirs.append(Path(found.stdout.strip()))
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        dirs.append(Path(pg_ctl).resolve().parent)
    installed = sorted(DEBIAN_VERSIONS.glob("*/bin"), key=lambda d: _version_key(d.parent.name))
    return dirs + installed[::-1]


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _start(settings: Settings, layout: Layout, out: TextIO | None) -> None:
    bindir = server_bindir(_data_version(layout))
    owner = _server_owner(layout)
    _check_socket_path(layout)
    _prepare(layout, owner)
    if _data_version(layout) is None:
        _say(out, f"initialising the private PostgreSQL cluster in {data_dir(layout)}")
        _initdb(bindir, settings, layout, owner)
    _write_config(layout, owner)
    _say(out, f"starting the private PostgreSQL cluster (log: {log_file(layout)})")
    argv = [str(bindir / "pg_ctl"), "start", "-w", "-t", str(START_TIMEOUT)]
    started = _run([*argv, "-D", str(data_dir(layout)), "-l", str(log_file(layout))], owner)
    if started.returncode != 0:
        last = _last_line(log_file(layout).read_text(errors="replace")) or _last_line(
            started.stdout + started.stderr
        )
        raise ConfigError(
            f"the private PostgreSQL cluster did not start: {last}; see {log_file(layout)}"
        )


def _initdb(
    bindir: Path, settings: Settings, layout: Layout, owner: pwd.struct_passwd | None
) -> None:
    argv = [
        str(bindir / "initdb"),
        f"--pgdata={data_dir(layout)}",
        f"--username={settings.postgres_auth_user}",
        "--auth-local=trust",  # the socket directory is ours alone (mode 0700)
        "--auth-host=reject",
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]
    done = _run(argv, owner, timeout=300)
    if done.returncode != 0:
        raise ConfigError(f"initdb failed: {_last_line(done.stderr + done.stdout)}")
    with (data_dir(layout) / "postgresql.conf").open("a") as conf:
        conf.write(
            f"\n# Llamaserve's settings, rewritten at every start\ninclude = '{CONFIG_FILE}'\n"
        )


def _write_config(layout: Layout, owner: pwd.struct_passwd | None) -> None:
    """Written at every start, so that a moved project still finds its socket."""
    sockets = str(socket_dir(layout).resolve()).replace("'", "''")
    path = data_dir(layout) / CONFIG_FILE
    path.write_text(
        "# Written by Llamaserve at every start of the private cluster: edits are lost.\n"
        "listen_addresses = ''\n"
        f"port = {PORT}\n"
        f"unix_socket_directories = '{sockets}'\n"
        "unix_socket_permissions = 0700\n"
    )
    path.chmod(0o600)
    _give(path, owner)


def _prepare(layout: Layout, owner: pwd.struct_passwd | None) -> None:
    """The data and socket directories and the log file, owned by the server's user; the
    logs' directory is ours, and the server's group may enter it (see logs.py)."""
    for directory in (data_dir(layout), socket_dir(layout)):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        _give(directory, owner)
    # Readable by the operator (root reads any file) and the server, who appends to it.
    logs.private_log(log_file(layout), group=None if owner is None else owner.pw_gid)
    _give(log_file(layout), owner)
    if owner is not None:
        for path in (data_dir(layout), socket_dir(layout), log_file(layout)):
            _check_reachable(path, owner)


def _server_owner(layout: Layout) -> pwd.struct_passwd | None:
    """The user the server runs as when that is not us: None unless we are root."""
    data = data_dir(layout)
    initialised = _data_version(layout) is not None
    if os.geteuid() != 0:
        if initialised and data.stat().st_uid != os.geteuid():
            name = _user_name(data.stat().st_uid)
            raise ConfigError(f"{data} belongs to user {name}: run Llamaserve as {name} or root")
        return None
    if initialised and data.stat().st_uid != 0:
        return pwd.getpwuid(data.stat().st_uid)
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError(
            "PostgreSQL refuses to run as root and there is no 'postgres' system user to run "
            "the private cluster: create one (useradd --system postgres) or run as another user"
        ) from None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _check_reachable(path: Path, owner: pwd.struct_passwd) -> None:
    for directory in reversed(path.resolve().parents):
        info = directory.stat()
        if info.st_uid == owner.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid == owner.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            raise ConfigError(
                f"the private PostgreSQL cluster runs as user {owner.pw_name} (it refuses "
                f"root), who cannot enter {directory}: `chmod o+x {directory}`, move the "
                "project, or point POSTGRES_AUTH_HOST in .env at a server"
            )


def _check_socket_path(layout: Layout) -> None:
    socket = socket_dir(layout).resolve() / f".s.PGSQL.{PORT}"
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"the private cluster's socket path {socket} is longer than Unix allows "
            f"({MAX_SOCKET_PATH} bytes): move the project, or set LLAMA_RUNTIME_DIR shorter"
        )


def _give(path: Path, owner: pwd.struct_passwd | None) -> None:
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _run(
    argv: list[str], owner: pwd.struct_passwd | None, timeout: float = START_TIMEOUT + 30
) -> subprocess.CompletedProcess[str]:
    """Run a server program as `owner` (None: as ourselves), detached from our terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    as_owner: dict[str, Any] = {}
    if owner is not None:
        env.update(HOME=owner.pw_dir, USER=owner.pw_name, LOGNAME=owner.pw_name)
        as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [], "cwd": "/"}
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        start_new_session=True,  # Ctrl-C in our terminal must not reach the server
        check=False,
        **as_owner,
    )


def _postmaster_pid(layout: Layout) -> int | None:
    """The pid in postmaster.pid if a postgres process has it, else None."""
    try:
        pid = int((data_dir(layout) / "postmaster.pid").read_text().split("\n", 1)[0])
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if command.startswith("postgres") else None


def _data_version(layout: Layout) -> str | None:
    """The major version the data directory was initialised with, or None if it was not."""
    try:
        return (data_dir(layout) / "PG_VERSION").read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def _lock(layout: Layout) -> Iterator[None]:
    """Serialises starting the cluster and creating its database between processes."""
    layout.run.mkdir(parents=True, exist_ok=True)
    with (layout.run / "postgres.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


async def _create_database(settings: Settings, layout: Layout) -> None:
    kwargs = {**connect_kwargs(settings, layout), "database": "postgres"}
    try:
        conn = await asyncpg.connect(**kwargs, timeout=10)
    except asyncpg.InvalidAuthorizationSpecificationError:
        raise ConfigError(
            f"the private PostgreSQL cluster in {data_dir(layout)} has no role "
            f"{settings.postgres_auth_user}: it was initialised with another POSTGRES_AUTH_USER; "
            "set that one back in .env"
        ) from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(
            f"cannot connect to the private PostgreSQL cluster ({exc}); see {log_file(layout)}"
        ) from exc
    try:
        name = settings.postgres_auth_db
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # created meanwhile
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    finally:
        await conn.close()


def _quote_ident(name: str) -> str:
    """An SQL identifier, quoted (for the statements that take no parameters)."""
    return '"' + name.replace('"', '""') + '"'


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _say(out: TextIO | None, message: str) -> None:
    if out is not None:
        print(f"llamaserve: {message}", file=out, flush=True)
