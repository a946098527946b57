"""llama.cpp built once (ops.build), without a real compile: a `cmake` that only pretends,
printing a recorded build's output, and the real sdist packaged around stand-in libraries."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from llamaserve.config import ConfigError
from llamaserve.ops import build
from tests.test_buildlog import RECORDED


def test_a_build_is_named_by_the_version_and_cmake_args(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMASERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.setattr(build, "cpu_args", list)  # a CPU without AMX
    version = build.LLAMA_CPP_PYTHON_VERSION
    assert build.llama_server_path() == tmp_path / f"llama.cpp/{version}-default/bin/llama-server"
    assert build.log_path() == tmp_path / f"logs/llama.cpp-{version}-default.log"
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    assert build.build_key().startswith(f"{version}-") and build.build_key() != f"{version}-default"
    assert build.build_dir().parent == tmp_path / "llama.cpp"


def test_amx_is_turned_off_where_the_native_target_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp's AMX kernels die of SIGILL on a Sapphire Rapids Xeon (`ops/build.py`)."""
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho '#define __AVX512F__ 1'; echo \"$AMX\"\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.setenv("AMX", "")
    assert build.cpu_args() == []
    assert build.build_key().endswith("-default")
    monkeypatch.setenv("AMX", "#define __AMX_TILE__ 1")
    assert build.cpu_args() == [f"-DCMAKE_C_FLAGS={build.NO_AMX}",
                                f"-DCMAKE_CXX_FLAGS={build.NO_AMX}"]  # fmt: skip
    assert not build.build_key().endswith("-default")  # a build of its own, not the old one
    monkeypatch.setenv("CC", str(tmp_path / "none"))
    assert build.cpu_args() == []


def test_ninja_unless_a_generator_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMAKE_GENERATOR", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert build.generator_args(["-DGGML_CUDA=on"]) == ["-G", "Ninja"]
    assert build.generator_args(["-GUnix Makefiles"]) == []
    monkeypatch.setenv("CMAKE_GENERATOR", "Unix Makefiles")
    assert build.generator_args([]) == []
    monkeypatch.delenv("CMAKE_GENERATOR")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert build.generator_args([]) == []


FAKE_CMAKE = """#!/bin/sh
# Configures nothing; "builds" llama-server and two libraries, printing a recorded output.
case "$1" in
  -S) mkdir -p "$4"; echo "-- Configuring done" ;;
  --build)
    cat "{recorded}"
    [ -n "$FAIL_BUILD" ] && {{ echo "ld: cannot find -lfoo: No such file"; exit 2; }}
    mkdir -p "$2/bin" && touch "$2/bin/llama-server" "$2/bin/libllama.so" "$2/bin/libggml.so"
    echo "[100%] Built target llama-server" ;;
esac
"""


@pytest.fixture
def fake_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with a tiny sdist, and a `cmake` on PATH that only pretends."""
    cache = tmp_path / "cache"
    source = tmp_path / f"llama_cpp_python-{build.LLAMA_CPP_PYTHON_VERSION}"
    (source / "vendor" / "llama.cpp").mkdir(parents=True)
    (source / "vendor" / "llama.cpp" / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    (cache / "sdist").mkdir(parents=True)
    with tarfile.open(cache / "sdist" / build.SDIST_NAME, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "cmake").write_text(FAKE_CMAKE.format(recorded=RECORDED))
    (tools / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LLAMASERVE_CACHE_DIR", str(cache))
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on -DGGML_NATIVE=OFF")
    return cache


def test_one_build_gives_llama_server_and_the_libraries(fake_toolchain: Path) -> None:
    out = io.StringIO()
    built = build.ensure_build(out)
    assert sorted(p.name for p in (built / "bin").iterdir()) == ["llama-server"]
    assert sorted(p.name for p in (built / "lib").iterdir()) == ["libggml.so", "libllama.so"]
    assert not list(built.parent.glob("*.partial"))  # sources and objects are gone
    assert "warning:" not in out.getvalue()
    assert str(build.log_path()) in out.getvalue()
    assert "warning:" in build.log_path().read_text()
    configured = build.log_path().read_text().splitlines()[0]
    # The user's CMAKE_ARGS come last, so that they win.
    assert configured.endswith("-DGGML_CUDA=on -DGGML_NATIVE=OFF")
    assert build.ensure_build(io.StringIO()) == built  # cached: nothing runs again


def test_a_failed_build_leaves_no_build_in_the_cache(
    fake_toolchain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_BUILD", "1")
    out = io.StringIO()
    with pytest.raises(ConfigError, match=r"compiling llama.cpp failed \(cmake exited"):
        build.ensure_build(out)
    assert not build.build_dir().exists()
    assert not list(build.build_dir().parent.iterdir())  # nor what it left half-built
    assert "cannot find -lfoo" in out.getvalue()  # the tail of the log
    assert out.getvalue().count("warning:") <= 3  # only what the tail holds

    monkeypatch.delenv("FAIL_BUILD")
    assert build.ensure_build(io.StringIO()) == build.build_dir()  # and the next try builds


@pytest.mark.slow  # the registry (the sdist's build requirements) and the build cache
def test_llama_cpp_python_is_packaged_with_the_libraries_and_compiles_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real sdist, packaged with LLAMA_BUILD=OFF around two stand-in libraries."""
    sdist = build.cache_dir() / "sdist" / build.SDIST_NAME
    if not sdist.is_file():
        pytest.skip("run ./runtime/install.sh first: the cache has no llama-cpp-python sdist")
    monkeypatch.setenv("LLAMASERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    (tmp_path / "cache" / "sdist").mkdir(parents=True)
    (tmp_path / "cache" / "sdist" / sdist.name).symlink_to(sdist)
    lib = build.build_dir() / "lib"
    lib.mkdir(parents=True)
    (lib / "libllama.so").write_bytes(b"\x7fELF stand-in")
    (lib / "libggml.so").write_bytes(b"\x7fELF stand-in")
    (build.build_dir() / "bin").mkdir()
    (build.build_dir() / "bin" / "llama-server").touch()
    out = io.StringIO()
    wheel = build.python_wheel(out)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.read("llama_cpp/lib/libllama.so") == b"\x7fELF stand-in"
    assert "llama_cpp/lib/libggml.so" in names and "llama_cpp/llama_cpp.py" in names
    logged = build.log_path().read_text()
    assert "Building C" not in logged and "Building CXX" not in logged
    assert build.python_wheel(io.StringIO()) == wheel  # cached
