"""bin/user_management_cli.sh and bin/bootstrap_user_cli.sh, run as a user runs them, against
a real database: every command, text and --json output, errors, exit codes, --help."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llamaserve.cli import main as cli_main
from llamaserve.ops.users import cli as users_cli
from llamaserve.store import migrations, quotas, users
from tests.conftest import ROOT, free_port
from tests.pgfixtures import PgDatabase

CLI = ROOT / "bin" / "user_management_cli.sh"
BOOTSTRAP = ROOT / "bin" / "bootstrap_user_cli.sh"
KEY = re.compile(r"^key:\s+(lsk_[0-9a-f]{10}_[A-Za-z0-9_-]{43})$", re.M)
USER_FIELDS = {"id", "username", "enabled", "rate_limit", "rate_window_seconds", "created_at"}
USER_FIELDS |= {"token_rate_limit", "token_quota", "quota_period"}
SUMMARY_FIELDS = USER_FIELDS | {"active_keys", "last_used", "requests_24h", "tokens_24h", "quota"}
QUOTA_FIELDS = {"tokens", "period", "period_start", "resets_at", "used", "reserved", "left"}
KEY_FIELDS = {"username", "key_id", "key", "expires_at"}
USAGE_FIELDS = {"username", "requests", "errors", "prompt_tokens", "completion_tokens"}
USAGE_FIELDS |= {"uncounted", "bytes_in", "bytes_out", "p50_ms", "p95_ms", "quota"}
# The token settings the CLI's output depends on, whatever the checkout's .env says.
TOKEN_DEFAULTS = {
    "LLAMA_PROXY_TOKEN_QUOTA": "0",
    "LLAMA_PROXY_QUOTA_PERIOD": "day",
    "LLAMA_PROXY_TOKEN_RATE_LIMIT": "0",
}


def run(
    script: Path, *args: str, env: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one line a failed command prints, checked for `needles`."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("user_management_cli.sh: error: "), lines
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@dataclass
class Cli:
    database: PgDatabase

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run(CLI, *args, env={**self.database.env, **TOKEN_DEFAULTS, **env})

    def ok_with(self, env: dict[str, str], *args: str) -> str:
        result = self(*args, **env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture
def cli(pg_database: PgDatabase) -> Cli:
    return Cli(pg_database)


@dataclass
class InProcess:
    """`llamaserve users ...` in this process: what the script runs, without its start-up
    time, for the long lists of error cases."""

    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    def __call__(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        for name in os.environ:
            if name.startswith(("LLAMA_", "POSTGRES_")):
                self.monkeypatch.delenv(name)
        for name, value in env.items():
            self.monkeypatch.setenv(name, value)
        self.monkeypatch.setenv("LLAMASERVE_ROOT", str(ROOT))
        try:
            code = cli_main(["users", *args])
        except SystemExit as exit:
            code = int(exit.code or 0)
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(monkeypatch, capsys)


def test_every_command_help_shows_an_example() -> None:
    parser = users_cli.build_parser()
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(subparsers.choices) == {
        *("check", "init-db", "create-user", "list-users", "disable-user", "enable-user"),
        *("delete-user", "create-key", "list-keys", "revoke-key", "rotate-key", "set-limits"),
        *("set-quota", "usage", "logs"),
    }
    for name, command in subparsers.choices.items():
        assert re.search(
            rf"^examples?:\n  ./bin/user_management_cli.sh {name}\b", command.format_help(), re.M
        ), name


def test_help_through_the_script_needs_no_database(pg_database: PgDatabase) -> None:
    unreachable = {**pg_database.env, "POSTGRES_AUTH_HOST": "127.0.0.1"}
    for args in (["--help"], ["create-user", "--help"], ["usage", "-h"]):
        result = run(CLI, *args, env=unreachable)
        assert result.returncode == 0 and "./bin/user_management_cli.sh" in result.stdout


def test_init_db_twice_and_check(pg_empty_database: PgDatabase) -> None:
    cli = Cli(pg_empty_database)
    assert "not initialised: run ./bin/user_management_cli.sh init-db" in cli.ok("check")
    error_line(cli("list-users"), "not initialised", "init-db")
    assert "database initialised" in cli.ok("init-db")
    version = migrations.latest()
    assert f"already at schema version {version}" in cli.ok("init-db")
    assert f"database OK (private cluster in {pg_empty_database.layout.runtime}" in cli.ok("check")
    assert f"schema version {version}" in cli.ok("check")


def test_a_newer_schema_is_refused(cli: Cli) -> None:
    cli.database.execute("INSERT INTO llamaserve_schema (version) VALUES (99)")
    error_line(cli("list-users"), "version 99, newer than this Llamaserve")
    error_line(cli("check"), "newer")


def test_create_user_shows_the_key_once(cli: Cli) -> None:
    result = cli("create-user", "--username", "alice")
    assert result.returncode == 0, result.stderr
    assert "created user alice; rate limit 60/60s (default)" in result.stdout
    match = KEY.search(result.stdout)
    assert match, result.stdout
    key = match.group(1)
    assert "shown only once and cannot be shown again" in result.stderr
    for listing in (("list-users",), ("list-keys", "--json"), ("logs", "--json")):
        assert key not in cli.ok(*listing)


def test_create_user_json_and_list_users(cli: Cli) -> None:
    created = cli.json("create-user", "--username", "bob", "--rate-limit", "10", "--window", "30")
    assert set(created) == USER_FIELDS | {"key_id", "key"}
    assert (created["username"], created["rate_limit"], created["rate_window_seconds"]) == (
        "bob",
        10,
        30,
    )
    assert created["key"].startswith(f"lsk_{created['key_id']}_")
    cli.ok("create-user", "--username", "alice")
    listed = cli.json("list-users")
    assert [u["username"] for u in listed] == ["alice", "bob"]
    assert set(listed[0]) == SUMMARY_FIELDS
    assert (listed[1]["active_keys"], listed[1]["last_used"]) == (1, None)
    table = cli.ok("list-users").splitlines()
    assert re.split(r"\s{2,}", table[0]) == [
        *("USER", "STATE", "KEYS", "LIMIT", "TPM", "QUOTA", "QUOTA USED", "QUOTA LEFT"),
        *("CREATED", "LAST USED", "REQ 24H", "TOKENS 24H"),
    ]
    assert re.match(
        r"alice\s+enabled\s+1\s+60/60s \(default\)\s+none \(default\)\s+none \(default\)"
        r"\s+-\s+-\s+\d{4}-.*never\s+0\s+0$",
        table[1],
    )
    assert re.match(r"bob\s+enabled\s+1\s+10/30s\s", table[2])
    assert listed[0]["quota"] is None


def test_duplicate_and_invalid_usernames(cli: Cli) -> None:
    cli.ok("create-user", "--username", "alice")
    error_line(cli("create-user", "--username", "alice"), "user alice already exists")
    error_line(cli("create-user", "--username", "Alice"), "invalid username 'Alice'")
    error_line(cli("create-user", "--username", "carol", "--window", "5"), "--window needs")
    assert [u["username"] for u in cli.json("list-users")] == ["alice"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["disable-user", "--username", "nobody"], "no such user: nobody"),
        (["enable-user", "--username", "nobody"], "no such user: nobody"),
        (["delete-user", "--username", "nobody", "--yes"], "no such user: nobody"),
        (["create-key", "--username", "nobody"], "no such user: nobody"),
        (["list-keys", "--username", "nobody"], "no such user: nobody"),
        (["set-limits", "--username", "nobody", "--default"], "no such user: nobody"),
        (["set-limits", "--username", "nobody", "--token-rate-limit", "5"], "no such user"),
        (["set-quota", "--username", "nobody", "--none"], "no such user: nobody"),
        (["usage", "--user", "nobody"], "no such user: nobody"),
        (["logs", "--user", "nobody"], "no such user: nobody"),
        (["revoke-key", "--key-id", "0123456789"], "no such key: 0123456789"),
        (["rotate-key", "--key-id", "0123456789"], "no such key: 0123456789"),
    ],
)
def test_unknown_users_and_keys(
    pg_database: PgDatabase, in_process: InProcess, args: list[str], message: str
) -> None:
    error_line(in_process(pg_database.env, *args), message)


def test_an_unknown_user_through_the_script(cli: Cli) -> None:
    error_line(cli("disable-user", "--username", "nobody"), "no such user: nobody")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["no-such-command"],
        ["create-user"],
        ["create-user", "--username", "a", "--rate-limit", "-1"],
        ["set-limits", "--username", "a"],
        ["set-limits", "--username", "a", "--rate-limit", "5", "--default"],
        ["set-limits", "--username", "a", "--token-rate-limit", "5", "--default"],
        ["set-limits", "--username", "a", "--token-rate-limit", "-5"],
        ["set-quota", "--username", "a"],
        ["set-quota", "--username", "a", "--tokens", "5", "--none"],
        ["set-quota", "--username", "a", "--tokens", "0"],
        ["set-quota", "--username", "a", "--tokens", "5", "--per", "7x"],
        ["set-quota", "--username", "a", "--tokens", "5", "--per", "year"],
        ["set-quota", "--username", "a", "--none", "--per", "day"],
        ["set-quota", "--username", "a", "--default", "--per", "6h"],
        ["usage", "--since", "5x"],
        ["logs", "-n", "0"],
        ["create-key", "--username", "a", "--expires-in", "0d"],
    ],
)
def test_usage_errors_exit_2(in_process: InProcess, args: list[str]) -> None:
    result = in_process({}, *args)  # refused before any database is needed
    assert result.returncode == 2, result.stderr
    assert "usage: user_management_cli.sh" in result.stderr


def test_a_usage_error_through_the_script(cli: Cli) -> None:
    result = cli("usage", "--since", "yesterday")
    assert result.returncode == 2 and "invalid duration 'yesterday'" in result.stderr


def test_disable_and_enable_user(cli: Cli) -> None:
    cli.ok("create-user", "--username", "alice")
    assert "disabled alice" in cli.ok("disable-user", "--username", "alice")
    assert cli.json("list-users")[0]["enabled"] is False
    assert re.search(r"^alice\s+disabled\s", cli.ok("list-users"), re.M)
    assert "enabled alice" in cli.ok("enable-user", "--user", "alice")
    assert cli.json("list-users")[0]["enabled"] is True


def test_keys_create_revoke_rotate(cli: Cli) -> None:
    first = cli.json("create-user", "--username", "alice")["key_id"]
    second = cli.json("create-key", "--username", "alice", "--expires-in", "30d")
    assert set(second) == KEY_FIELDS and second["username"] == "alice"
    expires = datetime.fromisoformat(second["expires_at"]) - datetime.now(UTC)
    assert timedelta(days=29, hours=23) < expires <= timedelta(days=30)
    cli.ok("create-user", "--username", "bob")
    short = cli.ok("create-key", "--username", "bob", "--expires-in", "2s")
    assert re.search(r"valid until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", short)  # to the second

    assert f"revoked key {first}" in cli.ok("revoke-key", "--key-id", first)
    assert f"key {first} was already revoked" in cli.ok("revoke-key", "--key-id", first)
    error_line(cli("rotate-key", "--key-id", first), f"key {first} is revoked")

    rotated = cli.json("rotate-key", "--key-id", second["key_id"])
    assert set(rotated) == KEY_FIELDS | {"replaces"}
    assert rotated["replaces"] == second["key_id"] and rotated["username"] == "alice"
    states = {k["key_id"]: k["state"] for k in cli.json("list-keys", "--username", "alice")}
    assert states == {first: "revoked", second["key_id"]: "revoked", rotated["key_id"]: "active"}
    assert rotated["expires_at"] == second["expires_at"]  # the old key's expiry, kept
    text = cli.ok("rotate-key", "--key-id", rotated["key_id"], "--expires-in", "never")
    assert f"revoked key {rotated['key_id']}; the new key of alice" in text and KEY.search(text)
    assert "valid until" not in text
    assert re.search(rf"^{first}\s+alice\s+revoked\s", cli.ok("list-keys"), re.M)


def test_set_limits(cli: Cli) -> None:
    cli.ok("create-user", "--username", "alice")
    assert "alice: rate limit 10/60s" in cli.ok(
        "set-limits", "--username", "alice", "--rate-limit", "10"
    )
    out = cli.ok("set-limits", "--username", "alice", "--rate-limit", "5", "--window", "30")
    assert "alice: rate limit 5/30s" in out
    assert "rate limit none" in cli.ok("set-limits", "--username", "alice", "--rate-limit", "0")
    [alice] = cli.json("list-users")
    assert (alice["rate_limit"], alice["rate_window_seconds"]) == (0, None)
    out = cli.ok("set-limits", "--username", "alice", "--default")
    assert "alice: rate limit 60/60s (default)" in out
    [alice] = cli.json("list-users")
    assert (alice["rate_limit"], alice["rate_window_seconds"]) == (None, None)
    error_line(cli("set-limits", "--username", "alice", "--default", "--window", "9"), "--window")


def test_set_limits_of_tokens_per_minute(cli: Cli) -> None:
    cli.ok("create-user", "--username", "alice")
    out = cli.ok("set-limits", "--username", "alice", "--token-rate-limit", "20000")
    assert "alice: rate limit 60/60s (default); token rate limit 20000/min" in out
    out = cli.ok("set-limits", "--user", "alice", "--rate-limit", "5", "--token-rate-limit", "0")
    assert "alice: rate limit 5/60s; token rate limit none" in out
    [alice] = cli.json("list-users")
    assert (alice["rate_limit"], alice["token_rate_limit"]) == (5, 0)
    out = cli.ok("set-limits", "--username", "alice", "--rate-limit", "7")  # the other stays
    assert "token rate limit none" in out
    assert re.search(r"^alice\s+enabled\s+1\s+7/60s\s+none\s", cli.ok("list-users"), re.M)
    error_line(cli("set-limits", "--username", "alice", "--token-rate-limit", "1", "--window", "9"))
    out = cli.ok_with({"LLAMA_PROXY_TOKEN_RATE_LIMIT": "900"}, "set-limits", "--user", "alice",
                      "--default")  # fmt: skip
    assert "alice: rate limit 60/60s (default); token rate limit 900/min (default)" in out
    [alice] = cli.json("list-users")
    assert (alice["rate_limit"], alice["token_rate_limit"]) == (None, None)


def charge(database: PgDatabase, username: str, want: int, tokens: int) -> quotas.Reservation:
    """A request of the user, admitted and charged as the gateway does it."""

    async def run() -> quotas.Reservation:
        conn = await database.connect()
        try:
            user = await users.get_user(conn, username=username)
            assert user is not None
            r = await quotas.reserve(conn, user_id=user.id, want=want, default_quota=0,
                                     default_period="day", default_tpm=0)  # fmt: skip
            await quotas.settle(conn, user_id=user.id, period_start=r.period_start,
                                granted=r.granted, tokens=tokens)  # fmt: skip
            return r
        finally:
            await conn.close()

    return asyncio.run(run())


def test_set_quota_and_what_is_left(cli: Cli) -> None:
    cli.ok("create-user", "--username", "alice")
    cli.ok("create-user", "--username", "bob")
    out = cli.ok("set-quota", "--username", "alice", "--tokens", "200000")
    assert out.strip() == "alice: token quota 200000/day"
    out = cli.ok("set-quota", "--username", "alice", "--tokens", "50000", "--per", "6h")
    assert out.strip() == "alice: token quota 50000/6h"
    [alice, bob] = cli.json("list-users")
    assert (alice["token_quota"], alice["quota_period"]) == (50000, "21600s")
    assert set(alice["quota"]) == QUOTA_FIELDS and alice["quota"]["left"] == 50000
    assert bob["quota"] is None

    r = charge(cli.database, "alice", 1000, 1234)
    assert r.granted == 1000
    [alice, _] = cli.json("list-users")
    quota = alice["quota"]
    assert (quota["tokens"], quota["period"], quota["used"], quota["left"]) == (
        50000, "21600s", 1234, 48766,
    )  # fmt: skip
    start = datetime.fromisoformat(quota["period_start"])
    assert start.hour % 6 == 0 and start.minute == 0 and start.tzinfo is not None
    assert datetime.fromisoformat(quota["resets_at"]) - start == timedelta(hours=6)
    table = cli.ok("list-users")
    assert re.search(r"^alice\s+.*\s50000/6h\s+1234\s+48766\s", table, re.M)
    assert re.search(r"^bob\s+.*\snone \(default\)\s+-\s+-\s", table, re.M)

    # The default quota applies to bob, not to alice (her own), nor once she has none.
    wide = {"LLAMA_PROXY_TOKEN_QUOTA": "1000", "LLAMA_PROXY_QUOTA_PERIOD": "week"}
    assert re.search(r"^bob\s+.*\s1000/week \(default\)\s+0\s+1000\s",
                     cli.ok_with(wide, "list-users"), re.M)  # fmt: skip
    assert cli.ok("set-quota", "--username", "alice", "--none").strip() == (
        "alice: token quota none"
    )
    [alice, bob] = json.loads(cli.ok_with(wide, "list-users", "--json"))
    assert (alice["token_quota"], alice["quota_period"], alice["quota"]) == (0, None, None)
    assert bob["quota"]["tokens"] == 1000 and bob["quota"]["period"] == "week"
    out = cli.ok_with(wide, "set-quota", "--username", "alice", "--default")
    assert out.strip() == "alice: token quota 1000/week (default)"
    [alice, _] = cli.json("list-users")
    assert (alice["token_quota"], alice["quota_period"], alice["quota"]) == (None, None, None)


def test_usage_shows_the_quota(cli: Cli) -> None:
    created = cli.json("create-user", "--username", "alice")
    cli.ok("create-user", "--username", "bob")
    cli.ok("set-quota", "--username", "alice", "--tokens", "5000", "--per", "month")
    charge(cli.database, "alice", 100, 300)
    for username, user_id in (("alice", created["id"]), ("bob", None)):
        cli.database.execute(
            "INSERT INTO llama_requests (request_id, created_at, user_id, username, method, "
            "path, status, outcome, latency_ms, prompt_tokens, completion_tokens) "
            "VALUES ('r', now(), $1, $2, 'POST', '/v1/chat/completions', 200, 'ok', 10, 200, 100)",
            user_id,
            username,
        )
    rows = {r["username"]: r for r in cli.json("usage")}
    assert set(rows["alice"]) == USAGE_FIELDS
    assert rows["alice"]["quota"]["used"] == 300 and rows["alice"]["quota"]["left"] == 4700
    assert rows["bob"]["quota"] is None
    text = cli.ok("usage")
    assert re.search(r"^alice\s+1\s+0\s+200\s+100\s.*\s5000/month\s+300\s+4700$", text, re.M)
    assert re.search(r"^bob\s+1\s+0\s+200\s+100\s.*\s-\s+-\s+-$", text, re.M)


def test_delete_user_asks_and_keeps_log_rows(cli: Cli) -> None:
    created = cli.json("create-user", "--username", "alice")
    for _ in range(2):
        cli.database.execute(
            "INSERT INTO llama_requests (request_id, created_at, user_id, username, key_id, "
            "method, path, status, outcome, latency_ms) "
            "VALUES ('r', now(), $1, 'alice', $2, 'GET', '/v1/models', 200, 'ok', 1)",
            created["id"],
            created["key_id"],
        )
    error_line(cli("delete-user", "--username", "alice"), "--yes")  # no terminal to ask
    assert len(cli.json("list-users")) == 1
    out = cli.ok("delete-user", "--username", "alice", "--yes")
    assert "deleted user alice, its 1 key and its stored responses; kept its 2 request" in out
    assert cli.json("list-users") == []
    logged = cli.json("logs", "--user", "alice")
    assert [(r["username"], r["user_id"]) for r in logged] == [("alice", None)] * 2


def test_usage_and_logs(cli: Cli) -> None:
    alice = cli.json("create-user", "--username", "alice")
    engine = "http://127.0.0.1:8000"
    rows = [  # (minutes ago, status, outcome, latency, prompt and completion tokens, engine)
        (1, 200, "ok", 120.0, 10, 30, engine),
        (2, 200, "ok", 80.0, 5, 15, engine),
        (3, 429, "rejected", 1.0, None, None, None),
        (4, 200, "cancelled", 40.0, None, None, engine),  # a stream the client left
        (5, 503, "error", 2.0, None, None, None),  # the database away: no engine had it
        (120, 200, "ok", 60.0, 1, 1, engine),
    ]
    for minutes, status, outcome, latency, prompt, completion, sent_to in rows:
        cli.database.execute(
            "INSERT INTO llama_requests (request_id, created_at, user_id, username, key_id, "
            "method, path, status, outcome, latency_ms, prompt_tokens, completion_tokens, "
            "bytes_in, bytes_out, engine) VALUES ($1, now() - $2::interval, $3, 'alice', $4, "
            "'POST', '/v1/chat/completions', $5, $6, $7, $8, $9, 100, 2000, $10)",
            f"req-{minutes}",
            timedelta(minutes=minutes),
            alice["id"],
            alice["key_id"],
            status,
            outcome,
            latency,
            prompt,
            completion,
            sent_to,
        )
    [usage] = cli.json("usage", "--user", "alice", "--since", "30m")
    assert set(usage) == USAGE_FIELDS
    assert (usage["requests"], usage["errors"], usage["prompt_tokens"]) == (5, 3, 15)
    # Uncounted: the stream left on the engine, not the request no engine ever had.
    assert (usage["completion_tokens"], usage["uncounted"]) == (45, 1)
    assert (usage["bytes_in"], usage["p50_ms"]) == (500, 100.0)
    assert cli.json("usage", "--since", "1d")[0]["requests"] == 6
    text = cli.ok("usage", "--since", "30m")
    assert "requests in the last 30m" in text and "UNCOUNTED" in text
    assert re.search(
        r"^alice\s+5\s+3\s+15\s+45\s+1\s+500 B\s+10.0 kB\s+100\s+118\s+-\s+-\s+-$", text, re.M
    )
    assert "no requests in the last 1m" in cli.ok("usage", "--since", "1m")

    logged = cli.json("logs", "-n", "2")
    assert [r["request_id"] for r in logged] == ["req-2", "req-1"]
    assert logged[0]["key_id"] == alice["key_id"] and logged[0]["prompt_tokens"] == 5
    lines = cli.ok("logs", "--user", "alice", "-n", "3").splitlines()
    assert lines[0].split()[:4] == ["TIME", "REQUEST", "USER", "KEY"]
    assert re.search(r"req-3\s+alice\s+\w+\s+429\s+rejected\s+POST /v1/chat/completions", lines[1])
    assert len(lines) == 4 and lines[3].split()[2] == "req-1"


def test_an_unreachable_database_is_one_line(cli: Cli) -> None:
    port = str(free_port())
    secret = "Pa55-w0rd-never-shown"
    result = cli(
        "list-users",
        POSTGRES_AUTH_HOST="127.0.0.1",
        POSTGRES_AUTH_PORT=port,
        POSTGRES_AUTH_PASSWORD=secret,
    )
    error_line(result, f"cannot reach PostgreSQL at llamaserve@127.0.0.1:{port}/", "running?")
    assert secret not in result.stdout + result.stderr


def test_an_invalid_setting_is_one_line(pg_database: PgDatabase, in_process: InProcess) -> None:
    result = in_process({**pg_database.env, "POSTGRES_AUTH_SSLMODE": "sometimes"}, "list-users")
    error_line(
        result, "invalid POSTGRES_AUTH_SSLMODE='sometimes' in the environment: Input should be"
    )


# --- bootstrap_user_cli.sh ---------------------------------------------------------------


def project_copy(tmp_path: Path, *, installed: bool = True) -> Path:
    """A project with the bootstrap script and .env.example, sharing this checkout's .venv."""
    root = tmp_path / "project"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BOOTSTRAP, root / "bin")
    shutil.copy2(ROOT / ".env.example", root)
    if installed:
        (root / ".venv").symlink_to(ROOT / ".venv")
    return root


def test_bootstrap_creates_env_and_checks_the_database(tmp_path: Path, cli: Cli) -> None:
    root = project_copy(tmp_path)
    first = run(root / "bin" / "bootstrap_user_cli.sh", env=cli.database.env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "created .env from .env.example" in first.stdout
    assert (root / ".env").read_text() == (ROOT / ".env.example").read_text()
    assert oct((root / ".env").stat().st_mode & 0o777) == "0o600"
    assert f"database OK (private cluster in {cli.database.layout.runtime}" in first.stdout
    assert f"schema version {migrations.latest()}" in first.stdout

    again = run(root / "bin" / "bootstrap_user_cli.sh", env=cli.database.env)
    assert again.returncode == 0 and "created .env" not in again.stdout
    assert "database OK" in again.stdout


def test_bootstrap_says_when_init_db_is_next(tmp_path: Path, pg_empty_database: PgDatabase) -> None:
    root = project_copy(tmp_path)
    result = run(root / "bin" / "bootstrap_user_cli.sh", env=pg_empty_database.env)
    assert result.returncode == 0, result.stderr
    assert "not initialised: run ./bin/user_management_cli.sh init-db" in result.stdout


def test_bootstrap_says_what_is_wrong(tmp_path: Path, cli: Cli) -> None:
    root = project_copy(tmp_path)
    env = {**cli.database.env, "POSTGRES_AUTH_HOST": "127.0.0.1"}
    env["POSTGRES_AUTH_PORT"] = str(free_port())
    error_line(run(root / "bin" / "bootstrap_user_cli.sh", env=env), "cannot reach PostgreSQL")


def test_bootstrap_installs_when_needed(tmp_path: Path, cli: Cli) -> None:
    root = project_copy(tmp_path, installed=False)
    (root / "runtime").mkdir()
    stub = root / "runtime" / "install.sh"  # the real one is tested by tests/test_install.py
    stub.write_text(f'#!/usr/bin/env bash\necho "install ran"\nln -s "{ROOT}/.venv" .venv\n')
    stub.chmod(0o755)
    result = run(root / "bin" / "bootstrap_user_cli.sh", env=cli.database.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running ./runtime/install.sh" in result.stdout and "install ran" in result.stdout
    assert "database OK" in result.stdout
    assert os.path.islink(root / ".venv")


def test_bootstrap_makes_an_env_with_a_password_private(tmp_path: Path, cli: Cli) -> None:
    root = project_copy(tmp_path)
    env_file = root / ".env"
    shutil.copy(root / ".env.example", env_file)  # as the README says: mode 644
    env_file.chmod(0o644)

    def bootstrap() -> list[str]:
        result = run(root / "bin" / "bootstrap_user_cli.sh", env=cli.database.env)
        assert result.returncode == 0, result.stdout + result.stderr
        return [line for line in result.stderr.splitlines() if "warning" in line]

    assert bootstrap() == [] and stat.S_IMODE(env_file.stat().st_mode) == 0o644  # no secret
    text = env_file.read_text().replace('POSTGRES_AUTH_PASSWORD=""', 'POSTGRES_AUTH_PASSWORD="pw"')
    env_file.write_text(text)
    [warning] = bootstrap()
    assert warning.startswith("user_management_cli.sh: warning: ")
    assert warning.endswith(
        ".env holds POSTGRES_AUTH_PASSWORD and was readable by others (mode 644): made it 600"
    )
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert bootstrap() == []  # said once
