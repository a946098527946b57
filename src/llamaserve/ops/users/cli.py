"""The user CLI, `./bin/user_management_cli.sh` (= `llamaserve users`): parsing and exit codes.

Every command first starts the private PostgreSQL cluster when .env names no database
host, then opens one connection. Errors are one line on stderr and exit 1; usage
errors exit 2. The commands themselves live in commands.py.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta

import asyncpg

from llamaserve.config import (
    ConfigError,
    Layout,
    Settings,
    base_layout,
    load_settings,
    parse_period,
    protect_setting_files,
)
from llamaserve.ops import cluster
from llamaserve.ops.users import commands
from llamaserve.ops.users.commands import CLI, Context, Duration, Handler
from llamaserve.store import db, migrations
from llamaserve.store.errors import StoreError

PROG = "user_management_cli.sh"
DURATION = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
NO_SCHEMA_NEEDED = ("check", "init-db")

EXAMPLES = f"""\
first steps:
  {CLI} init-db
  {CLI} create-user --username alice     # prints alice's key, once
  {CLI} list-users

Add --help to any command for its options and an example.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check is not None:
        args.check(args)  # a usage error argparse cannot see by itself exits 2 here
    try:
        for warning in protect_setting_files(base_layout()):
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        settings, layout = load_settings()
        cluster.ensure_running(settings, layout, out=sys.stderr)
        return asyncio.run(_run(args, settings, layout))
    except (StoreError, ConfigError) as exc:
        return _fail(str(exc))
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # e.g. the server went away
        return _fail(f"database error: {exc}")
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, settings: Settings, layout: Layout) -> int:
    conn = await db.connect(settings, layout)
    try:
        if args.command not in NO_SCHEMA_NEEDED:
            await migrations.check_schema(conn)
        handler: Handler = args.handler
        return await handler(Context(conn, settings, layout), args)
    finally:
        await conn.close()


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the users and API keys of the Llamaserve gateway; read its log.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(check=None)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, summary: str, *examples: str) -> argparse.ArgumentParser:
        lines = "\n".join(f"  {CLI} {example}" for example in examples)
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog=("examples:\n" if len(examples) > 1 else "example:\n") + lines,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    add("check", commands.check, "check the database connection and schema", "check")
    add("init-db", commands.init_db, "create or upgrade the tables (safe to run again)", "init-db")

    sub = add(
        "create-user",
        commands.create_user,
        "create a user and print its first key, once",
        "create-user --username alice",
        "create-user --username batch-jobs --rate-limit 600 --window 60",
    )
    _username(sub)
    _limits(sub, default=False)
    _json(sub)

    _json(
        add(
            "list-users",
            commands.list_users,
            "list users, their keys, limits and use",
            "list-users",
        )
    )
    _username(
        add(
            "disable-user",
            commands.disable_user,
            "refuse a user's keys",
            "disable-user --username alice",
        )
    )
    _username(
        add(
            "enable-user",
            commands.enable_user,
            "accept a user's keys again",
            "enable-user --username alice",
        )
    )

    sub = add(
        "delete-user",
        commands.delete_user,
        "delete a user, its keys and stored responses; its request log rows are kept",
        "delete-user --username alice --yes",
    )
    _username(sub)
    sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    sub = add(
        "create-key",
        commands.create_key,
        "give a user another key and print it, once",
        "create-key --username alice",
        "create-key --username alice --expires-in 30d",
    )
    _username(sub)
    _expires_in(sub)
    _json(sub)

    sub = add(
        "list-keys",
        commands.list_keys,
        "list keys (ids and states, never the keys themselves)",
        "list-keys --username alice",
    )
    _username(sub, required=False)
    _json(sub)

    _key_id(
        add(
            "revoke-key",
            commands.revoke_key,
            "revoke a key at once",
            "revoke-key --key-id 3f2a9c1b0d",
        )
    )

    sub = add(
        "rotate-key",
        commands.rotate_key,
        "replace a key: print a new one, once, and revoke the old one at once",
        "rotate-key --key-id 3f2a9c1b0d",
    )
    _key_id(sub)
    _expires_in(sub, default="the old key's expiry")
    _json(sub)

    sub = add(
        "set-limits",
        commands.set_limits,
        "set a user's rate limits (requests, tokens per minute), or restore the defaults",
        "set-limits --username alice --rate-limit 10 --window 60",
        "set-limits --username alice --rate-limit 0      # no limit",
        "set-limits --username alice --token-rate-limit 20000",
        "set-limits --username alice --default",
    )
    _username(sub)
    _limits(sub, default=True)
    sub.add_argument(
        "--token-rate-limit",
        type=_count,
        metavar="N",
        help="tokens per minute, prompt and completion; 0 = no limit",
    )
    _check(sub, _one_limit)

    sub = add(
        "set-quota",
        commands.set_quota,
        "set a user's token quota per period, or none, or restore the default",
        "set-quota --username alice --tokens 200000 --per day",
        "set-quota --username alice --tokens 50000 --per 6h",
        "set-quota --username alice --none        # no quota, whatever the default",
        "set-quota --username alice --default",
    )
    _username(sub)
    _quota(sub)

    sub = add(
        "usage",
        commands.usage,
        "requests, errors, tokens, bytes and latency per user",
        "usage --since 7d",
        "usage --user alice --since 24h --json",
    )
    _user(sub)
    sub.add_argument(
        "--since",
        type=parse_duration,
        default="24h",
        metavar="SPAN",
        help="e.g. 30m, 24h (default), 7d",
    )
    _json(sub)

    sub = add("logs", commands.logs, "the latest requests, oldest first", "logs --user alice -n 20")
    _user(sub)
    sub.add_argument("-n", "--lines", type=_positive, default=50, help="how many (default 50)")
    _json(sub)
    return parser


def _username(sub: argparse.ArgumentParser, *, required: bool = True) -> None:
    sub.add_argument(
        "--username", "--user", dest="username", required=required, metavar="NAME", help="a user"
    )


def _user(sub: argparse.ArgumentParser) -> None:
    """The reports' spelling (usage --user U); --username works too."""
    sub.add_argument("--user", "--username", dest="username", metavar="NAME", help="only this user")


def _key_id(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--key-id", required=True, metavar="ID", help="as list-keys shows it")


def _json(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")


def _expires_in(sub: argparse.ArgumentParser, default: str = "never") -> None:
    sub.add_argument(
        "--expires-in",
        type=parse_expiry,
        metavar="SPAN",
        help=f"e.g. 30d, or never (default: {default})",
    )


def _limits(sub: argparse.ArgumentParser, *, default: bool) -> None:
    """--rate-limit and --window, and --default instead of them (set-limits)."""
    choice = sub.add_mutually_exclusive_group()
    choice.add_argument(
        "--rate-limit", type=_count, metavar="N", help="requests per window; 0 = no limit"
    )
    if default:
        choice.add_argument(
            "--default",
            action="store_true",
            help="use LLAMA_PROXY_RATE_LIMIT, its window and LLAMA_PROXY_TOKEN_RATE_LIMIT",
        )
    sub.add_argument(
        "--window",
        type=_positive,
        metavar="SECONDS",
        help="window of --rate-limit (default: LLAMA_PROXY_RATE_WINDOW_SECONDS)",
    )


def _quota(sub: argparse.ArgumentParser) -> None:
    choice = sub.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--tokens", type=_positive, metavar="N", help="tokens per period, prompt and completion"
    )
    choice.add_argument("--none", action="store_true", help="no quota for this user")
    choice.add_argument(
        "--default",
        action="store_true",
        help="use LLAMA_PROXY_TOKEN_QUOTA per LLAMA_PROXY_QUOTA_PERIOD",
    )
    sub.add_argument(
        "--per",
        type=_period,
        metavar="PERIOD",
        help="day (default), week, month (calendar, UTC), or a span: 6h, 30m, 2d",
    )
    _check(sub, _per_with_tokens)


def _check(
    sub: argparse.ArgumentParser, problem: Callable[[argparse.Namespace], str | None]
) -> None:
    """A rule on a command's arguments that argparse cannot express: broken, it is a
    usage error (exit 2), reported by main() before anything else happens."""

    def check(args: argparse.Namespace) -> None:
        if (message := problem(args)) is not None:
            sub.error(message)

    sub.set_defaults(check=check)


def _one_limit(args: argparse.Namespace) -> str | None:
    if args.default:
        tokens = args.token_rate_limit is not None
        return (
            "argument --token-rate-limit: not allowed with argument --default" if tokens else None
        )
    if args.rate_limit is None and args.token_rate_limit is None:
        return "one of the arguments --rate-limit --token-rate-limit --default is required"
    return None


def _per_with_tokens(args: argparse.Namespace) -> str | None:
    if args.per is not None and args.tokens is None:
        return "argument --per: allowed only with argument --tokens"
    return None


def _period(text: str) -> str:
    try:
        return parse_period(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_duration(text: str) -> Duration:
    """'30m', '24h', '7d' (also s and w)."""
    match = DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 30m, 24h or 7d"
        )
    return Duration(text.strip(), timedelta(**{UNITS[match.group(2)]: int(match.group(1))}))


def parse_expiry(text: str) -> Duration:
    """A span (see parse_duration), or 'never'."""
    if text.strip().lower() == "never":
        return Duration("never", None)
    return parse_duration(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: use 1 or more")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: use 0 or more")
    return int(text)
