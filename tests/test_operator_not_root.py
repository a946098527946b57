"""An operator who is not root, from their own copy of the project: install.sh, then the
README's multi-user story (bootstrap, init-db, create-user, console.sh start with the
gateway, chats through it, console.sh stop). Their private PostgreSQL, engine and gateway
all run as them.

Needs root (to become the unprivileged user) and the package registry (for their own
environment); llama-cpp-python comes from a copy of our build cache, so nothing is built.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from llamaserve.ops import build
from tests.conftest import ROOT, default_model, free_port

OPERATOR = "nobody"

pytestmark = [
    pytest.mark.slow,  # the whole story, with the model
    pytest.mark.skipif(os.geteuid() != 0, reason="becoming an unprivileged operator needs root"),
]


class Operator:
    """An unprivileged user with a copy of the project in a home of their own."""

    def __init__(self, user: pwd.struct_passwd, home: Path) -> None:
        self.user = user
        self.home = home
        self.project = home / "llamaserve"
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "USER": user.pw_name,
            "LANG": "C.UTF-8",
            "LLAMASERVE_CACHE_DIR": str(home / "cache"),
        }

    def run(self, *args: str, timeout: float = 600) -> str:
        """One of the project's scripts, as the operator; its output."""
        done = subprocess.run(
            [str(self.project / args[0]), *args[1:]], cwd=self.project, env=self.env,
            user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def set_config(self, **values: str) -> None:
        path = self.project / "runtime" / "config.env"
        lines = [
            line for line in path.read_text().splitlines() if line.split("=", 1)[0] not in values
        ]
        lines += [f'{key}="{value}"' for key, value in values.items()]
        path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def operator() -> Iterator[Operator]:
    try:
        user = pwd.getpwnam(OPERATOR)
    except KeyError:
        pytest.skip(f"no '{OPERATOR}' user on this machine")
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the project's files")
    home = Path(tempfile.mkdtemp(prefix="llamaserve-operator-"))
    home.chmod(0o755)
    made = Operator(user, home)
    try:
        # Their own copy of the project (its files under version control, as they stand),
        # the model, and our cached llama-cpp-python build.
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        for name in filter(None, files.split("\0")):
            target = made.project / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        shutil.copy2(default_model(), made.project / "models")
        for part in ("sdist", "wheels"):
            if (build.cache_dir() / part).is_dir():
                shutil.copytree(build.cache_dir() / part, home / "cache" / part)
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
        yield made
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_an_operator_who_is_not_root(operator: Operator) -> None:
    operator.run("runtime/install.sh", "--engine", "llama-cpp-python")
    engine_port, gateway_port = free_port(), free_port()
    operator.set_config(
        LLAMA_SERVER_HOST="127.0.0.1",
        LLAMA_SERVER_PORT=str(engine_port),
        LLAMA_SERVER_BACKEND_URL=f"http://127.0.0.1:{engine_port}",
        LLAMA_PROXY_ENABLED="1",
        LLAMA_PROXY_PORT=str(gateway_port),
    )
    operator.run("bin/bootstrap_user_cli.sh")  # the private cluster: no .env database
    operator.run("bin/user_management_cli.sh", "init-db")
    created = operator.run(
        "bin/user_management_cli.sh", "create-user", "--username", "alice", "--json"
    )
    runtime = operator.project / "runtime"
    try:
        operator.run("console.sh", "start")
        client = OpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=json.loads(created)["key"]
        )
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert answer.choices[0].finish_reason in {"stop", "length"}
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=8,
            stream=True,
        )
        assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"

        # The database, the engine and the gateway all run as the operator.
        pids = [int((runtime / "pgdata" / "postmaster.pid").read_text().split()[0])]
        for name in ("engine", "gateway"):
            pids.append(json.loads((runtime / "run" / f"{name}.pid").read_text())["pid"])
        assert {Path(f"/proc/{pid}").stat().st_uid for pid in pids} == {operator.user.pw_uid}
        assert "alice" in operator.run("bin/user_management_cli.sh", "list-users")
    finally:
        operator.run("console.sh", "stop")
    assert not (runtime / "run" / "engine.pid").exists()
    assert not (runtime / "run" / "gateway.pid").exists()
