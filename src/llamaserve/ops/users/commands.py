"""What each command of the user CLI does, and how it prints its result.

The handlers receive an open connection (the schema already checked, except for
`check` and `init-db`) and the parsed arguments; they print to stdout, and raise the
store's errors for cli.py to report. A full key is printed once, when it is made.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from llamaserve.config import Layout, Settings, describe_period
from llamaserve.ops.tables import format_bytes, format_time, render_table
from llamaserve.store import db, migrations, quotas, reports, users
from llamaserve.store.errors import InvalidValue, NoSuchUser, SchemaMismatch
from llamaserve.store.keys import NewKey

CLI = "./bin/user_management_cli.sh"


@dataclass(frozen=True)
class Context:
    conn: asyncpg.Connection
    settings: Settings
    layout: Layout


@dataclass(frozen=True)
class Duration:
    text: str  # as the operator wrote it: 30m, 24h, 7d, never
    delta: timedelta | None  # None: never (only for --expires-in)


Handler = Callable[[Context, argparse.Namespace], Awaitable[int]]


async def check(ctx: Context, args: argparse.Namespace) -> int:
    where = db.describe(ctx.settings, ctx.layout)
    try:
        version = await migrations.check_schema(ctx.conn)
    except SchemaMismatch as exc:
        if exc.too_new:
            raise
        print(f"database OK ({where}); {exc}")
        return 0
    print(f"database OK ({where}), schema version {version}")
    return 0


async def init_db(ctx: Context, args: argparse.Namespace) -> int:
    applied = await migrations.migrate(ctx.conn)
    version = await migrations.check_schema(ctx.conn)
    where = db.describe(ctx.settings, ctx.layout)
    if not applied:
        print(f"database already at schema version {version} ({where})")
        return 0
    print(f"database initialised ({where}): applied {_versions(applied)}, now at {version}")
    print(f"next: {CLI} create-user --username NAME")
    return 0


async def create_user(ctx: Context, args: argparse.Namespace) -> int:
    if args.window is not None and args.rate_limit is None:
        raise InvalidValue("--window needs --rate-limit")
    async with ctx.conn.transaction():
        user = await users.create_user(
            ctx.conn,
            username=args.username,
            rate_limit=args.rate_limit,
            rate_window_seconds=args.window,
        )
        new = await users.create_key(ctx.conn, username=user.username)
    if args.json:
        _print_json({**asdict(user), "key_id": new.key_id, "key": new.key})
        return 0
    print(f"created user {user.username}; rate limit {describe_limit(user, ctx.settings)}")
    _print_new_key(new)
    return 0


async def list_users(ctx: Context, args: argparse.Namespace) -> int:
    summaries = await users.list_users(ctx.conn)
    usage = await _quota_usage(ctx)
    if args.json:
        _print_json([{**asdict(s), "quota": _quota_json(usage.get(s.username))} for s in summaries])
        return 0
    if not summaries:
        print(f"no users yet: {CLI} create-user --username NAME")
        return 0
    header = ["USER", "STATE", "KEYS", "LIMIT", "TPM", *QUOTA_HEADER, "CREATED", "LAST USED"]
    header += ["REQ 24H", "TOKENS 24H"]
    rows = [
        [
            s.username,
            "enabled" if s.enabled else "disabled",
            str(s.active_keys),
            describe_limit(s, ctx.settings),
            describe_token_rate(s, ctx.settings),
            *_quota_cells(describe_quota(s, ctx.settings), usage.get(s.username)),
            format_time(s.created_at),
            format_time(s.last_used, never="never"),
            str(s.requests_24h),
            str(s.tokens_24h),
        ]
        for s in summaries
    ]
    right = {"KEYS", "QUOTA USED", "QUOTA LEFT", "REQ 24H", "TOKENS 24H"}
    print(render_table(header, rows, right=right))
    return 0


async def disable_user(ctx: Context, args: argparse.Namespace) -> int:
    await users.set_enabled(ctx.conn, username=args.username, enabled=False)
    print(f"disabled {args.username}: the gateway refuses its keys")
    return 0


async def enable_user(ctx: Context, args: argparse.Namespace) -> int:
    await users.set_enabled(ctx.conn, username=args.username, enabled=True)
    print(f"enabled {args.username}")
    return 0


async def delete_user(ctx: Context, args: argparse.Namespace) -> int:
    if await users.get_user(ctx.conn, username=args.username) is None:
        raise NoSuchUser(f"no such user: {args.username}")
    if not args.yes and not _confirm(
        f"delete user {args.username}, all its keys and its stored responses? Its request log "
        "rows are kept. [y/N] "
    ):
        print("not deleted")
        return 1
    deleted = await users.delete_user(ctx.conn, username=args.username)
    print(
        f"deleted user {deleted.username}, its {_count(deleted.keys, 'key')} and its stored "
        f"responses; kept its "
        f"{_count(deleted.requests_kept, 'request log row')} (username kept, user id cleared)"
    )
    return 0


async def create_key(ctx: Context, args: argparse.Namespace) -> int:
    expires_at = _expiry(args.expires_in)
    new = await users.create_key(ctx.conn, username=args.username, expires_at=expires_at)
    if args.json:
        _print_json(_key_json(new, args.username, expires_at))
        return 0
    print(f"created a key for {args.username}" + _until(expires_at))
    _print_new_key(new)
    return 0


async def list_keys(ctx: Context, args: argparse.Namespace) -> int:
    found = await users.list_keys(ctx.conn, username=args.username)
    if args.json:
        _print_json(found)
        return 0
    header = ["KEY ID", "USER", "STATE", "CREATED", "EXPIRES", "REVOKED"]
    rows = [
        [
            k.key_id,
            k.username,
            k.state,
            format_time(k.created_at),
            format_time(k.expires_at, never="never"),
            format_time(k.revoked_at),
        ]
        for k in found
    ]
    print(render_table(header, rows) if rows else "no keys")
    return 0


async def revoke_key(ctx: Context, args: argparse.Namespace) -> int:
    if await users.revoke_key(ctx.conn, key_id=args.key_id):
        print(f"revoked key {args.key_id}: the gateway refuses it from now on")
    else:
        print(f"key {args.key_id} was already revoked")
    return 0


async def rotate_key(ctx: Context, args: argparse.Namespace) -> int:
    expiry: users.NewExpiry = _expiry(args.expires_in) if args.expires_in else users.KEEP
    rotated = await users.rotate_key(ctx.conn, key_id=args.key_id, expires_at=expiry)
    new, username = rotated.new, rotated.username
    if args.json:
        _print_json({**_key_json(new, username, rotated.expires_at), "replaces": args.key_id})
        return 0
    print(f"revoked key {args.key_id}; the new key of {username}" + _until(rotated.expires_at))
    _print_new_key(new)
    return 0


async def set_limits(ctx: Context, args: argparse.Namespace) -> int:
    """--rate-limit and --token-rate-limit each change their own limit; --default both."""
    if args.window is not None and args.rate_limit is None:
        raise InvalidValue("--window goes with --rate-limit")
    name, user = args.username, None
    async with ctx.conn.transaction():
        if args.default or args.rate_limit is not None:
            rate, window = (None, None) if args.default else (args.rate_limit, args.window)
            user = await users.set_limits(
                ctx.conn, username=name, rate_limit=rate, rate_window_seconds=window
            )
        if args.default or args.token_rate_limit is not None:
            tpm = None if args.default else args.token_rate_limit
            user = await users.set_token_rate_limit(ctx.conn, username=name, token_rate_limit=tpm)
    assert user is not None  # cli.py asks for one of the three
    print(
        f"{user.username}: rate limit {describe_limit(user, ctx.settings)}; "
        f"token rate limit {describe_token_rate(user, ctx.settings)}"
    )
    return 0


async def set_quota(ctx: Context, args: argparse.Namespace) -> int:
    if args.tokens:
        tokens, period = args.tokens, args.per or "day"
    else:
        tokens, period = (None if args.default else 0), None
    user = await users.set_quota(
        ctx.conn, username=args.username, token_quota=tokens, period=period
    )
    print(f"{user.username}: token quota {describe_quota(user, ctx.settings)}")
    return 0


async def usage(ctx: Context, args: argparse.Namespace) -> int:
    rows = await reports.usage(ctx.conn, username=args.username, since=args.since.delta)
    await _known_user(ctx, args.username, found=bool(rows))
    found = await _quota_usage(ctx, [r.username for r in rows if r.username])
    quotas_of = [found.get(r.username) if r.username else None for r in rows]
    if args.json:
        _print_json(
            [{**asdict(r), "quota": _quota_json(q)} for r, q in zip(rows, quotas_of, strict=True)]
        )
        return 0
    span = args.since.text
    if not rows:
        print(f"no requests in the last {span}")
        return 0
    header = ["USER", "REQUESTS", "ERRORS", "PROMPT TOK", "COMPL TOK", "UNCOUNTED", "IN", "OUT"]
    header += ["P50", "P95", *QUOTA_HEADER]
    table = [
        [
            r.username or "(no user)",
            str(r.requests),
            str(r.errors),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            str(r.uncounted),
            format_bytes(r.bytes_in),
            format_bytes(r.bytes_out),
            _ms(r.p50_ms),
            _ms(r.p95_ms),
            *_quota_cells(_quota_text(q), q),
        ]
        for r, q in zip(rows, quotas_of, strict=True)
    ]
    print(
        f"requests in the last {span} (latency of successful requests; UNCOUNTED: ended "
        "before the engine counted their tokens, which are not in the totals; QUOTA: "
        "tokens used and left in the quota's current period)"
    )
    print(render_table(header, table, right=set(header[1:]) - {"QUOTA"}))
    return 0


async def logs(ctx: Context, args: argparse.Namespace) -> int:
    rows = await reports.recent(ctx.conn, username=args.username, limit=args.lines)
    await _known_user(ctx, args.username, found=bool(rows))
    if args.json:
        _print_json(rows)
        return 0
    header = ["TIME", "REQUEST", "USER", "KEY", "STATUS", "OUTCOME", "REQUEST LINE"]
    header += ["MS", "TTFT", "TOKENS", "ERROR"]
    table = [
        [
            format_time(r.created_at, seconds=True),
            r.request_id,
            r.username or "-",
            r.key_id or "-",
            str(r.status),
            r.outcome,
            f"{r.method} {r.path}",
            _ms(r.latency_ms),
            _ms(r.ttft_ms),
            _tokens(r.prompt_tokens, r.completion_tokens),
            (r.error or "")[:60],
        ]
        for r in rows
    ]
    print(render_table(header, table, right={"STATUS", "MS", "TTFT"}) if rows else "no requests")
    return 0


def describe_limit(user: users.User, settings: Settings) -> str:
    """A user's effective rate limit: '60/60s (default)', '10/30s' or 'none'."""
    default = user.rate_limit is None and user.rate_window_seconds is None
    rate = settings.llama_proxy_rate_limit if user.rate_limit is None else user.rate_limit
    window = user.rate_window_seconds or settings.llama_proxy_rate_window_seconds
    text = "none" if rate == 0 else f"{rate}/{window}s"
    return f"{text} (default)" if default else text


def describe_token_rate(user: users.User, settings: Settings) -> str:
    """A user's effective tokens per minute: '20000/min (default)', '500/min' or 'none'."""
    tpm = user.token_rate_limit
    rate = settings.llama_proxy_token_rate_limit if tpm is None else tpm
    text = "none" if rate == 0 else f"{rate}/min"
    return f"{text} (default)" if tpm is None else text


def describe_quota(user: users.User, settings: Settings) -> str:
    """A user's effective token quota: '200000/day (default)', '50000/6h' or 'none'."""
    default = user.token_quota is None
    tokens = settings.llama_proxy_token_quota if default else user.token_quota
    period = user.quota_period or settings.llama_proxy_quota_period
    text = "none" if not tokens else f"{tokens}/{describe_period(period)}"
    return f"{text} (default)" if default else text


QUOTA_HEADER = ["QUOTA", "QUOTA USED", "QUOTA LEFT"]


def _quota_cells(quota: str, usage: quotas.QuotaUsage | None) -> list[str]:
    """QUOTA_HEADER's cells: the quota, and the tokens used and left in its current period."""
    if usage is None:
        return [quota, "-", "-"]
    return [quota, str(usage.used), str(usage.left)]


def _quota_text(usage: quotas.QuotaUsage | None) -> str:
    return "-" if usage is None else f"{usage.tokens}/{describe_period(usage.period)}"


def _quota_json(usage: quotas.QuotaUsage | None) -> dict[str, Any] | None:
    return None if usage is None else {k: v for k, v in asdict(usage).items() if k != "username"}


async def _quota_usage(
    ctx: Context, usernames: list[str] | None = None
) -> dict[str, quotas.QuotaUsage]:
    return await quotas.current_usage(
        ctx.conn,
        default_quota=ctx.settings.llama_proxy_token_quota,
        default_period=ctx.settings.llama_proxy_quota_period,
        usernames=usernames,
    )


async def _known_user(ctx: Context, username: str | None, *, found: bool) -> None:
    """An empty report for a name that is neither a user nor in the log is a typo."""
    if username and not found and await users.get_user(ctx.conn, username=username) is None:
        raise NoSuchUser(f"no such user: {username}")


def _print_new_key(new: NewKey) -> None:
    print(f"key id: {new.key_id}")
    print(f"key:    {new.key}")
    print("This key is shown only once and cannot be shown again: store it now.", file=sys.stderr)


def _key_json(new: NewKey, username: str, expires_at: datetime | None) -> dict[str, Any]:
    return {"username": username, "key_id": new.key_id, "key": new.key, "expires_at": expires_at}


def _expiry(expires_in: Duration | None) -> datetime | None:
    """When a key given now for `expires_in` expires; None: never."""
    if expires_in is None or expires_in.delta is None:
        return None
    return datetime.now(UTC) + expires_in.delta


def _until(expires_at: datetime | None) -> str:
    return "" if expires_at is None else f", valid until {format_time(expires_at, seconds=True)}"


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise InvalidValue("not deleted: add --yes to delete without a terminal to confirm")
    return input(question).strip().lower() in ("y", "yes")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _versions(applied: list[int]) -> str:
    return _count(len(applied), "migration") + " (" + ", ".join(map(str, applied)) + ")"


def _tokens(prompt: int | None, completion: int | None) -> str:
    """Prompt+completion, or '-' for a request that never reached the engine."""
    if prompt is None and completion is None:
        return "-"
    return f"{prompt or 0}+{completion or 0}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_encode))


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
