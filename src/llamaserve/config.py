"""Settings: one declared list, read from the environment, runtime/config.env and .env.

Precedence, highest first: the process environment, `runtime/config.env`,
`.env`. Every field's description is its documentation: docs/configuration.md is
generated from this list (`python -m llamaserve.config --docs`), and a test fails when
the page is stale.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from dotenv.parser import parse_stream
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENGINES = ("llama-cpp-python", "llama-server")
# A word of a key that says it is a template's value (CHANGE_ME, <your key>, INSERT_token):
# whole words only, so that a random key with "xxx" or "your" inside one still passes.
PLACEHOLDER_WORD = re.compile(r"^(change|insert|placeholder|your|todo|replace|x{3,})", re.I)
MIN_KEY_LENGTH = 16


CALENDAR_PERIODS = ("day", "week", "month")
SPAN = re.compile(r"^(\d+)([smhd])$")
SPAN_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
MAX_SPAN = 3660 * 86400  # ten years


def parse_period(text: str) -> str:
    """A quota period in its canonical form: `day`, `week`, `month` (calendar periods in
    UTC), or a span in whole seconds (`6h` -> `21600s`). ValueError says what is accepted."""
    value = text.strip().lower()
    if value in CALENDAR_PERIODS:
        return value
    match = SPAN.match(value)
    seconds = int(match[1]) * SPAN_SECONDS[match[2]] if match else 0
    if not 1 <= seconds <= MAX_SPAN:
        raise ValueError(
            f"invalid period {text!r}: use day, week, month, or a span such as 6h, 30m or 2d"
        )
    return f"{seconds}s"


def describe_period(period: str) -> str:
    """A canonical period as people write it: day, week, month, 6h, 90m, 45s."""
    if period in CALENDAR_PERIODS:
        return period
    seconds = int(period.removesuffix("s"))
    unit = next(unit for unit, size in SPAN_SECONDS.items() if seconds % size == 0)
    return f"{seconds // SPAN_SECONDS[unit]}{unit}"


def split_urls(value: str) -> list[str]:
    """The URLs of a comma-separated list (LLAMA_SERVER_BACKEND_URL)."""
    return [url.strip() for url in value.split(",") if url.strip()]


class Settings(BaseSettings):
    """Every setting Llamaserve reads; the environment variable is the upper-cased name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    # Engine
    llama_server_api_key: SecretStr = Field(
        SecretStr(""),
        description="Key the engine requires as a bearer token; install.sh generates 32 random "
        "bytes, URL-safe. Start refuses a key that is empty, a placeholder or shorter than 16 "
        "characters. With the gateway, users get keys of their own: never give them this one.",
    )
    llama_admin_api_key: SecretStr = Field(
        SecretStr(""),
        description="Operator's key for the gateway's `/metrics` and `/dashboard`; install.sh "
        "generates it as it does the engine's. Never a user's key. Empty, a placeholder or "
        "shorter than 16 characters: both are refused to everyone.",
    )
    llama_server_host: str = Field("0.0.0.0", description="Address the engine listens on.")
    llama_server_port: int = Field(8000, ge=1, le=65535, description="Port of the engine.")
    llama_model: str = Field(
        "",
        description="GGUF file to serve (a name in the models directory, or a path). "
        "May stay empty when the models directory holds exactly one .gguf.",
    )
    llama_kv_pool: int = Field(
        0,
        ge=0,
        description="Tokens of KV cache llama-server's slots share, whatever their number; "
        "0 = 8 times LLAMA_N_CTX, less if memory is short, at least LLAMA_N_CTX. A request "
        "waits until the pool has room for its prompt and its max_tokens (a whole context "
        "without max_tokens).",
    )
    llama_models_dir: Path = Field(
        Path("models"), description="Directory searched for .gguf files (relative to the project)."
    )
    llama_n_ctx: int = Field(
        4096,
        ge=0,
        description="Context size in tokens: what one request may use (with llama-server, "
        "its slots share one KV pool: LLAMA_KV_POOL); 0 = the model's own (with "
        "llama-server, shared by the slots).",
    )
    llama_n_threads: int = Field(
        0,
        ge=0,
        description="Threads for token generation; 0 = one fewer than the cores, at least 1, "
        "so the gateway and the database keep a core.",
    )
    llama_n_threads_batch: int = Field(
        0,
        ge=0,
        description="Threads for prompts and batches of several tokens (with llama-server, "
        "its busy slots' tokens are decoded as one batch); 0 = all cores.",
    )
    llama_n_gpu_layers: int = Field(
        0, description="Layers offloaded to a GPU (-1 = all); needs a GPU build (CMAKE_ARGS)."
    )
    llama_chat_format: str = Field(
        "",
        description="Chat format of llama-cpp-python (e.g. gemma, chatml, "
        "chatml-function-calling); with llama-server, llama.cpp's built-in template of that "
        "name. Empty = the model's own template. The config template sets gemma, which the "
        "default model needs.",
    )
    llama_engine_enabled: bool = Field(
        True,
        description="Run an engine on this machine; 0 = only the gateway, in front of the "
        "engines of LLAMA_SERVER_BACKEND_URL on other machines.",
    )
    llama_engine: Literal["llama-cpp-python", "llama-server"] = Field(
        "llama-server",
        description="Which llama.cpp server runs the model: llama-server (decodes "
        "LLAMA_PARALLEL requests together) or llama-cpp-python (one request at a time).",
    )
    llama_parallel: int = Field(
        0,
        ge=0,
        description="Slots of llama-server: requests it decodes at once, each with up to "
        "LLAMA_N_CTX tokens of context; 0 = chosen for the machine: 8 a core, between 4 and "
        "32 (`console.sh start` says how many). llama-cpp-python runs one.",
    )
    llama_server_bin: str = Field(
        "",
        description="A llama-server binary of your own (absolute, or relative to the project; "
        "recent enough for --api-key-file and --no-webui); empty = the one install.sh built.",
    )
    llama_start_timeout: float = Field(
        300.0, gt=0, description="Seconds `console.sh start` waits for the model to load."
    )
    llama_header_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a client of the engine or the gateway has to send a request's "
        "line and headers, from the connection's opening or the request's first byte "
        "(408 after; one that sent nothing is closed without an answer). Heads are also "
        "bounded to 64 KiB (431).",
    )
    llama_stop_timeout: float = Field(
        15.0,
        gt=0,
        description="Seconds `console.sh stop` waits after SIGTERM before SIGKILL; requests "
        "in flight (engine and gateway) get this less 5 s (at least half) to finish.",
    )
    llama_runtime_dir: Path = Field(
        Path("runtime"),
        description="Directory of config.env, logs/ and run/ (environment only).",
    )

    # Gateway (multi-user proxy)
    llama_proxy_enabled: bool = Field(
        False, description="Run the multi-user gateway in front of the engine."
    )
    llama_proxy_host: str = Field("0.0.0.0", description="Address the gateway listens on.")
    llama_proxy_port: int = Field(8001, ge=1, le=65535, description="Port of the gateway.")
    llama_server_backend_url: str = Field(
        "http://127.0.0.1:8000",
        description="Engine URL(s) the gateway forwards to, comma-separated; http:// or "
        "https://. A path in a URL (an engine behind a reverse proxy) goes before each "
        "request's.",
    )
    llama_proxy_rate_limit: int = Field(
        60, ge=0, description="Requests per user per window (0 = no limit)."
    )
    llama_proxy_rate_window_seconds: int = Field(
        60,
        ge=1,
        description="Length of the rate-limit window in seconds: a user may send the whole "
        "limit at once, then one more request every window / limit seconds.",
    )
    llama_proxy_token_rate_limit: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        description="Tokens (prompt and completion) per user per minute, for users without "
        "their own (`set-limits --token-rate-limit`); 0 = no limit. A request is admitted "
        "while the user's bucket holds a token, and its real tokens are taken when it ends "
        "(going into debt if need be); the bucket refills at this / 60 per second.",
    )
    llama_proxy_token_quota: int = Field(
        0,
        ge=0,
        description="Tokens (prompt and completion) per user per LLAMA_PROXY_QUOTA_PERIOD, "
        "for users without their own (`set-quota`); 0 = no quota. A request is admitted "
        "while the user has tokens left, and its completion is bounded to what is left.",
    )
    llama_proxy_quota_period: str = Field(
        "day",
        description="Period of LLAMA_PROXY_TOKEN_QUOTA: day, week (from Monday) or month, "
        "calendar periods in UTC, or a span such as 6h, 30m or 2d, windows aligned on the "
        "Unix epoch in UTC (6h: from 00:00, 06:00, 12:00, 18:00).",
    )

    llama_proxy_allow_public_engine: bool = Field(
        False,
        description="Let the gateway start while the engine listens on a public address "
        "(users could then bypass the gateway).",
    )
    llama_proxy_max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body the gateway accepts (413)."
    )
    llama_proxy_user_concurrency: int = Field(
        0,
        ge=0,
        description="Requests one user may have generating at once, across all gateways on "
        "the database (0 = no limit beyond the fair queue).",
    )
    llama_proxy_reserved_slots: int = Field(
        0,
        ge=0,
        description="Engine slots kept free for users with nothing generating, so that they "
        "start at once; a user alone never gets them (0 = none; not applied when the "
        "engines have no more slots than this).",
    )
    llama_proxy_fairness: Literal["tokens", "requests"] = Field(
        "tokens",
        description="What the fair queue counts of each user's service: `tokens` (prompt "
        "and completion; the next free slot goes to the waiting user served the fewest) or "
        "`requests` (the waiting user with the fewest generating, then round-robin).",
    )
    llama_proxy_queue_size: int = Field(
        1000, ge=0, description="Requests waiting for an engine, all users together (503 above)."
    )
    llama_proxy_user_queue_size: int = Field(
        100, ge=0, description="Requests one user may have waiting (429 above)."
    )
    llama_proxy_queue_timeout: float = Field(
        300.0, gt=0, description="Seconds a request may wait for an engine (503 after)."
    )
    llama_proxy_routing: Literal["prefix", "least-loaded"] = Field(
        "prefix",
        description="How the gateway chooses among several engines: `prefix` sends a "
        "request to the engine it sent the longest prefix of its conversation to (where "
        "the engine likely has it cached: turn N of a conversation where turn N-1 ran), "
        "unless that engine has no free slot, or another has 2 more; `least-loaded` sends "
        "each request to the engine with the most free slots. See docs/gateway.md, Routing.",
    )
    llama_proxy_health_interval: float = Field(
        2.0, gt=0, description="Seconds between the gateway's health probes of each engine."
    )
    llama_proxy_upstream_timeout: float = Field(
        600.0, gt=0, description="Seconds the gateway waits for the engine between two reads (504)."
    )
    llama_proxy_store_responses: bool = Field(
        True,
        description="Keep the responses of /v1/responses that ask to be stored (`store`, true "
        "unless a request says false), per user, in the database: for `previous_response_id` "
        "and GET/DELETE /v1/responses/{id}. 0 = keep none, and answer `store: false`.",
    )
    llama_proxy_responses_ttl_days: int = Field(
        30,
        ge=1,
        le=36500,
        description="Days a stored response is kept (OpenAI keeps them 30); after, it is "
        "gone as if deleted.",
    )
    llama_proxy_metrics_user_label: bool = Field(
        True,
        description="Label the gateway's per-user metrics (`/metrics`) with the user's name; "
        "0 = sum them over all users (no `user` label).",
    )

    # Database of users, keys and the request log
    postgres_auth_host: str = Field(
        "",
        description="PostgreSQL host of users, keys and the request log; empty = a private "
        "cluster under runtime/ (needs PostgreSQL's server programs).",
    )
    postgres_auth_port: int = Field(
        5432, ge=1, le=65535, description="PostgreSQL port (the private cluster has none)."
    )
    postgres_auth_db: str = Field(
        "llamaserve", description="Database name; the private cluster creates it."
    )
    postgres_auth_user: str = Field(
        "llamaserve", description="Database user; the private cluster's superuser."
    )
    postgres_auth_password: SecretStr = Field(
        SecretStr(""),
        description="Database password; never printed (the private cluster needs none).",
    )
    postgres_auth_sslmode: Literal[
        "disable", "allow", "prefer", "require", "verify-ca", "verify-full"
    ] = Field(
        "prefer",
        description="SSL mode of the database connection, with libpq's meanings (not used "
        "by the private cluster).",
    )

    @field_validator("llama_proxy_quota_period")
    @classmethod
    def _canonical_period(cls, value: str) -> str:
        return parse_period(value)

    def backend_urls(self) -> list[str]:
        return split_urls(self.llama_server_backend_url)

    def responses_ttl(self) -> timedelta:
        """How long a stored response is kept (LLAMA_PROXY_RESPONSES_TTL_DAYS)."""
        return timedelta(days=self.llama_proxy_responses_ttl_days)

    def stop_grace(self) -> float:
        """Seconds the requests in flight get to finish after SIGTERM, in the gateway and
        in the engines. `console.sh stop` SIGKILLs at LLAMA_STOP_TIMEOUT: the rest is for
        ending the others with an error (and, in the gateway, writing their rows)."""
        return max(self.llama_stop_timeout - 5, self.llama_stop_timeout / 2)

    def threads(self) -> int:
        return self.llama_n_threads or max(1, (os.cpu_count() or 1) - 1)

    def threads_batch(self) -> int:
        return self.llama_n_threads_batch or max(1, os.cpu_count() or 1)

    def api_key_problem(self) -> str | None:
        """Why the engine key is unusable, or None when it is fine."""
        key = self.llama_server_api_key.get_secret_value().strip()
        if not key:
            return "LLAMA_SERVER_API_KEY is empty"
        if is_placeholder(key):
            return "LLAMA_SERVER_API_KEY is still a placeholder"
        if len(key) < MIN_KEY_LENGTH:
            return f"LLAMA_SERVER_API_KEY is shorter than {MIN_KEY_LENGTH} characters"
        return None

    def admin_key(self) -> str | None:
        """The operator's key, or None when it is unusable (then nobody is an operator)."""
        key = self.llama_admin_api_key.get_secret_value().strip()
        if not key or is_placeholder(key) or len(key) < MIN_KEY_LENGTH:
            return None
        return key


def is_placeholder(key: str) -> bool:
    """A key that is a template's value rather than a secret (`<...>`, CHANGE_ME, xxxx)."""
    return "<" in key or any(PLACEHOLDER_WORD.match(word) for word in re.split(r"[-_\s.]+", key))


def new_engine_key() -> str:
    """A fresh engine key, never one `api_key_problem` would refuse."""
    while True:
        key = secrets.token_urlsafe(32)
        if not is_placeholder(key):
            return key


@dataclass(frozen=True)
class Layout:
    """Where a project's files live: config, logs, pidfiles, models."""

    root: Path
    runtime: Path
    models: Path

    @property
    def config_file(self) -> Path:
        return self.runtime / "config.env"

    @property
    def config_name(self) -> str:
        """The config file as messages name it: relative to the project when inside it
        (runtime/config.env, or LLAMA_RUNTIME_DIR's)."""
        if self.config_file.is_relative_to(self.root):
            return str(self.config_file.relative_to(self.root))
        return str(self.config_file)

    @property
    def env_file(self) -> Path:
        return self.root / ".env"

    @property
    def logs(self) -> Path:
        return self.runtime / "logs"

    @property
    def run(self) -> Path:
        return self.runtime / "run"


def project_root() -> Path:
    return Path(os.environ.get("LLAMASERVE_ROOT") or Path.cwd()).resolve()


def runtime_dir(root: Path) -> Path:
    return _under(root, Path(os.environ.get("LLAMA_RUNTIME_DIR") or "runtime"))


def load_settings(root: Path | None = None, runtime: Path | None = None) -> tuple[Settings, Layout]:
    """Read the settings of the project at `root` (default: LLAMASERVE_ROOT or the cwd).

    ConfigError names the first line of a file that cannot be read, and every setting
    whose value is invalid, with where it came from.
    """
    layout = base_layout(root, runtime)
    files = _setting_files(layout)
    for file in files:
        _check_syntax(file)
    try:
        settings = Settings(_env_file=files, llama_runtime_dir=layout.runtime)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_invalid(exc, files)) from None
    models = _under(layout.root, settings.llama_models_dir)
    return settings, Layout(layout.root, layout.runtime, models)


def base_layout(root: Path | None = None, runtime: Path | None = None) -> Layout:
    """The project's layout before its settings are read (models in the default place):
    enough to stop its processes or read their logs when the config is broken."""
    root = root or project_root()
    runtime = runtime or runtime_dir(root)
    return Layout(root, runtime, root / "models")


def unknown_settings(layout: Layout) -> list[str]:
    """Warnings for names in the setting files that look like settings but are none
    (a typo there is otherwise ignored)."""
    known = {name.upper() for name in Settings.model_fields}
    warnings = []
    for file in _setting_files(layout):
        for name in _names_in(file):
            if name.startswith(("LLAMA_", "POSTGRES_")) and name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                warnings.append(f"{_shown(file)}: {name} is not a setting and is ignored{hint}")
    return warnings


def protect_setting_files(layout: Layout) -> list[str]:
    """Make each setting file that gives a secret (a password, a key) a value readable by
    its owner alone (mode 600); a warning for each file that was readable by others."""
    warnings = []
    for file in _setting_files(layout):
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
        except OSError:  # missing: nothing to protect
            continue
        held = secrets_in(file)
        if not mode & 0o077 or not held:
            continue
        said = f"{_shown(file)} holds {', '.join(held)} and was readable by others (mode {mode:o})"
        try:
            file.chmod(0o600)
        except OSError as exc:
            warnings.append(f"{said}; it could not be made 600 ({exc.strerror}): chmod 600 it")
        else:
            warnings.append(f"{said}: made it 600")
    return warnings


def secrets_in(file: Path) -> list[str]:
    """The secret settings (typed SecretStr) to which a setting file gives a value."""
    fields = Settings.model_fields.items()
    secret = {name.upper() for name, field in fields if field.annotation is SecretStr}
    given = [b.key.upper() for b in _bindings(file) if b.key and not b.error and b.value]
    return sorted(secret.intersection(given))


def _setting_files(layout: Layout) -> tuple[Path, Path]:
    """Lowest precedence first (the process environment comes before both)."""
    return (layout.env_file, layout.config_file)


def _check_syntax(file: Path) -> None:
    for binding in _bindings(file):
        if binding.error:
            line = binding.original.string.splitlines()[0] if binding.original.string else ""
            raise ConfigError(
                f"{_shown(file)} line {binding.original.line}: cannot read {line.strip()!r} "
                '(write NAME="value", with matching quotes)'
            )


def _names_in(file: Path) -> list[str]:
    return [b.key for b in _bindings(file) if b.key and not b.error]


def _bindings(file: Path) -> list[Any]:
    try:
        with file.open(encoding="utf-8") as stream:
            return list(parse_stream(stream))
    except OSError:  # missing: nothing to read (start says what is needed)
        return []


def _invalid(exc: ValidationError, files: tuple[Path, Path]) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]).upper() if error["loc"] else "a setting"
        problems.append(
            f"invalid {name}={str(error.get('input'))!r} in {_source(name, files)}: {error['msg']}"
        )
    return "; ".join(problems)


def _source(name: str, files: tuple[Path, Path]) -> str:
    """Where the value of a setting came from: the environment wins, then the last file."""
    if any(key.upper() == name for key in os.environ):
        return "the environment"
    for file in reversed(files):
        if name in (key.upper() for key in _names_in(file)):
            return _shown(file)
    return "the settings"


def _shown(file: Path) -> str:
    """A file as the operator would name it: relative to the cwd when under it."""
    try:
        return str(file.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(file)


def _under(root: Path, path: Path) -> Path:
    return path if path.is_absolute() else root / path


def is_engine_url(url: str) -> bool:
    """An http(s) URL with a host: something the gateway can forward to."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class ConfigError(Exception):
    """A setting or file that stops Llamaserve from starting; the message is one clear line."""


REGENERATE = ".venv/bin/python -m llamaserve.config --docs > docs/configuration.md"
TYPE_NAMES = {str: "text", int: "integer", float: "number", Path: "path", SecretStr: "secret"}


def settings_reference(root: Path) -> str:
    """docs/configuration.md: every setting's name, default, type, file and description, in
    the sections of `Settings`. The file is the template of `root` that lists the setting."""
    files = {name: "runtime/config.env" for name in _names_in(root / "runtime/config.env.template")}
    files |= {name: ".env" for name in _names_in(root / ".env.example") if name not in files}
    lines = [
        "# Configuration",
        "",
        f"<!-- Generated from Settings in src/llamaserve/config.py: `{REGENERATE}` -->",
        "",
        "Every setting Llamaserve reads. Each is read from the process environment, then",
        "`runtime/config.env`, then `.env`: the first that gives it a value wins. *File* names",
        "the file whose template (`runtime/config.env.template`, `.env.example`) lists it.",
        'Values are written `NAME="value"`; a boolean is `1` or `0`. Install-time variables',
        "and the checks `console.sh start` makes are in [operations](operations.md).",
    ]
    sections, section = _sections(), None
    for name, field in Settings.model_fields.items():
        if sections[name] != section:
            section = sections[name]
            lines += ["", f"## {section}", "", "| Setting | Default | Type | File | Description |"]
            lines.append("| --- | --- | --- | --- | --- |")
        cells = (f"`{name.upper()}`", _default(field.default), _type(field))
        where = files.get(name.upper(), "environment only")
        lines.append(f"| {' | '.join(cells)} | {where} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _sections() -> dict[str, str]:
    """The section of each setting: the comment alone on a line after a blank one in
    `Settings` (`# Engine`) that comes before it."""
    sections: dict[str, str] = {}
    section, previous = "Settings", "blank"
    for line in inspect.getsource(Settings).splitlines():
        text = line.strip()
        if text.startswith("# ") and not previous:
            section = text[2:]
        elif (field := re.match(r"(\w+):", text)) and field[1] in Settings.model_fields:
            sections[field[1]] = section
        previous = text
    return sections


def _default(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        value = int(value)
    return f"`{value}`" if str(value) else "(empty)"


def _type(field: Any) -> str:
    if get_origin(field.annotation) is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in get_args(field.annotation))
    if field.annotation is bool:
        return "boolean"
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    bounds = [f"{signs[a]} {getattr(rule, a)}" for rule in field.metadata for a in signs
              if hasattr(rule, a)]  # fmt: skip
    kind = TYPE_NAMES[field.annotation]
    return f"{kind}, {' and '.join(bounds)}" if bounds else kind


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":  # the generator of docs/configuration.md (see REGENERATE)
    import sys

    if sys.argv[1:] != ["--docs"]:
        sys.exit(f"usage: {REGENERATE}")
    sys.stdout.write(settings_reference(project_root()))
