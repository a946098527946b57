"""runtime/install.sh: prerequisites first, idempotence, the key, the default model."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamaserve.config import Layout, Settings
from llamaserve.ops import install
from tests.conftest import ROOT, default_model, run

INSTALL = ROOT / "runtime" / "install.sh"
TOOLS = ["dirname", "grep", "head", "sort", "cat", "sha256sum", "cut", "rm", "cc", "c++", "cmake"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "POSTGRES_"))}
    env.update(extra)
    return env


def config_text(runtime: Path) -> str:
    return (runtime / "config.env").read_text()


@pytest.mark.slow  # the whole install: the engine build and the model
def test_install_writes_a_private_config_once_and_keeps_it(tmp_path: Path) -> None:
    env = clean_env(LLAMA_RUNTIME_DIR=str(tmp_path / "rt"))
    first = run([str(INSTALL)], env)
    assert first.returncode == 0, first.stdout + first.stderr
    config = tmp_path / "rt" / "config.env"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    lines = config_text(tmp_path / "rt").splitlines()
    key_line = next(line for line in lines if line.startswith("LLAMA_SERVER_API_KEY="))
    key = key_line.split("=", 1)[1].strip('"')
    assert len(key) >= 43 and set(key) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert key not in first.stdout + first.stderr  # the key is never printed
    assert first.stdout.rstrip().endswith("./console.sh start")

    before = config.read_bytes()
    second = run([str(INSTALL)], env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert config.read_bytes() == before
    assert "already installed" in second.stdout and "keeping" in second.stdout
    assert "building" not in second.stdout.lower()


def test_the_config_gets_two_different_keys_and_an_old_one_gains_the_admin_key(
    tmp_path: Path,
) -> None:
    layout = Layout(ROOT, tmp_path / "rt", ROOT / "models")
    out = io.StringIO()
    install.ensure_config(layout, out)
    text = layout.config_file.read_text()
    engine_key = Settings(_env_file=layout.config_file).llama_server_api_key.get_secret_value()
    admin_key = Settings(_env_file=layout.config_file).admin_key()
    assert admin_key and engine_key and admin_key != engine_key
    assert admin_key not in out.getvalue() and engine_key not in out.getvalue()

    # A config.env from before the admin key: it gains one, once, and keeps the rest.
    old = "\n".join(line for line in text.splitlines() if "LLAMA_ADMIN_API_KEY" not in line)
    layout.config_file.write_text(old + "\n")
    install.ensure_config(layout, out)
    install.ensure_config(layout, out)
    again = layout.config_file.read_text()
    assert again.startswith(old) and again.count("LLAMA_ADMIN_API_KEY=") == 1
    assert Settings(_env_file=layout.config_file).admin_key() not in (None, admin_key)

    # One that sets it empty on purpose is left alone: then nobody is an operator.
    layout.config_file.write_text(old + '\nLLAMA_ADMIN_API_KEY=""\n')
    install.ensure_config(layout, out)
    assert layout.config_file.read_text() == old + '\nLLAMA_ADMIN_API_KEY=""\n'
    assert Settings(_env_file=layout.config_file).admin_key() is None


@pytest.mark.slow  # the whole install: the engine build and the model
def test_install_reuses_the_llama_server_build(tmp_path: Path) -> None:
    """bin/test.sh built it (or found it) already: a run takes seconds and builds nothing."""
    env = clean_env(LLAMA_RUNTIME_DIR=str(tmp_path / "rt"))
    began = time.monotonic()
    result = run([str(INSTALL), "--engine", "llama-server"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - began < 60
    assert "reusing the llama-server build" in result.stdout
    assert "building" not in result.stdout.lower()
    assert 'LLAMA_ENGINE="llama-server"' in config_text(tmp_path / "rt")


@pytest.mark.slow  # the whole install: the engine build and the model
def test_llama_server_is_the_default_engine_and_llama_cpp_python_the_other(
    tmp_path: Path,
) -> None:
    default = run([str(INSTALL)], clean_env(LLAMA_RUNTIME_DIR=str(tmp_path / "a")))
    assert default.returncode == 0, default.stdout + default.stderr
    assert 'LLAMA_ENGINE="llama-server"' in config_text(tmp_path / "a")
    assert "reusing the llama-server build" in default.stdout

    env = clean_env(LLAMA_RUNTIME_DIR=str(tmp_path / "b"))
    other = run([str(INSTALL), "--engine", "llama-cpp-python"], env)
    assert other.returncode == 0, other.stdout + other.stderr
    assert 'LLAMA_ENGINE="llama-cpp-python"' in config_text(tmp_path / "b")
    assert "llama-server" not in other.stdout  # neither built nor reused

    # An existing config is kept; naming another engine says how to switch to it.
    switch = run([str(INSTALL), "--engine", "llama-server"], env)
    assert switch.returncode == 0, switch.stdout + switch.stderr
    assert 'LLAMA_ENGINE="llama-cpp-python"' in config_text(tmp_path / "b")
    assert 'To run llama-server: LLAMA_ENGINE="llama-server"' in switch.stdout


def test_install_refuses_an_unknown_engine(tmp_path: Path) -> None:
    result = run([str(INSTALL), "--engine", "vllm"], clean_env(LLAMA_RUNTIME_DIR=str(tmp_path)))
    assert result.returncode == 1 and "unknown engine: vllm" in result.stderr


@pytest.mark.slow  # the whole install: the engine build and the model
def test_install_provides_the_default_model_with_checksum(tmp_path: Path) -> None:
    models = tmp_path / "models"
    env = clean_env(LLAMA_RUNTIME_DIR=str(tmp_path / "rt"), LLAMA_MODELS_DIR=str(models))
    result = run([str(INSTALL)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100%" in result.stdout and "sha256 verified" in result.stdout
    provided = models / default_model().name
    assert sha256(provided) == sha256(default_model())
    assert not list(models.glob("*.partial"))


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fake_clone(tmp_path: Path, missing: str) -> tuple[Path, dict[str, str]]:
    """A copy of install.sh with a PATH that lacks one tool."""
    clone = tmp_path / "clone"
    (clone / "runtime").mkdir(parents=True)
    shutil.copy(INSTALL, clone / "runtime" / "install.sh")
    shutil.copy(ROOT / "pyproject.toml", clone)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    for tool in TOOLS:
        found = shutil.which(tool)
        if tool != missing and found:
            (bin_dir / tool).symlink_to(found)
    return clone, clean_env(PATH=str(bin_dir))


@pytest.mark.parametrize(("missing", "needle"), [("cmake", "cmake"), ("c++", "C++ compiler")])
def test_a_missing_prerequisite_stops_before_anything(
    tmp_path: Path, missing: str, needle: str
) -> None:
    clone, env = fake_clone(tmp_path, missing)
    result = subprocess.run(
        ["/bin/bash", str(clone / "runtime" / "install.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "install" in lines[0]
    assert not (clone / ".venv").exists()


def test_an_old_python_is_refused(tmp_path: Path) -> None:
    clone, env = fake_clone(tmp_path, "")
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    env["PYTHON"] = str(old)
    result = subprocess.run(
        ["/bin/bash", str(clone / "runtime" / "install.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "3.11" in result.stderr
    assert not (clone / ".venv").exists()
