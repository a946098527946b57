#!/usr/bin/env bash
# Installs Llamaserve: a virtual environment in .venv, llama.cpp built once and cached
# outside the repository, runtime/config.env with a fresh key, and the default model.
# Safe to run twice: a second run changes nothing and takes seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

die() { echo "install.sh: error: $*" >&2; exit 1; }

usage() {
  cat <<'USAGE'
usage: ./runtime/install.sh [--dev] [--engine llama-server|llama-cpp-python]

  --dev           also install the test and lint tools (pytest, openai, ruff, mypy)
  --engine NAME   the engine to install (repeatable); a new runtime/config.env runs it.
                  Default: the LLAMA_ENGINE of runtime/config.env, llama-server for a new
                  one. Both come from one build of llama.cpp; llama-cpp-python is always
                  installed.

Environment: PYTHON (interpreter to use), CMAKE_ARGS (passed to the llama.cpp build,
e.g. CMAKE_ARGS="-DGGML_CUDA=on"), LLAMASERVE_CACHE_DIR (build cache, default
~/.cache/llamaserve; the compiler's output goes to its logs/).
USAGE
}

extras=""
engines=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="[dev]" ;;
    --engine)
      [ $# -ge 2 ] || { usage >&2; die "--engine needs a name (llama-cpp-python or llama-server)"; }
      engines+=(--engine "$2"); shift ;;
    --engine=*) engines+=(--engine "${1#--engine=}") ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done
for ((i = 1; i < ${#engines[@]}; i += 2)); do
  case "${engines[$i]}" in
    llama-cpp-python|llama-server) ;;
    *) usage >&2; die "unknown engine: ${engines[$i]} (llama-cpp-python or llama-server)" ;;
  esac
done

# --- prerequisites: checked before anything is changed ---------------------------
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python="$candidate"; break
    fi
  done
fi
[ -n "$python" ] || die "Python 3.11 or newer is required: install it (apt-get install python3) or set PYTHON"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  die "$python is older than Python 3.11: install 3.11+ or set PYTHON"
"$python" -c 'import venv, ensurepip' 2>/dev/null ||
  die "Python's venv module is missing: install it (apt-get install python3-venv)"
command -v cmake >/dev/null 2>&1 || die "cmake is required to build llama.cpp: install it (apt-get install cmake)"
cmake_version="$(cmake --version | head -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1)"
printf '%s\n3.21\n' "$cmake_version" | sort -V -C -r 2>/dev/null ||
  die "cmake $cmake_version is too old (3.21+ needed): install a newer cmake"
command -v "${CC:-cc}" >/dev/null 2>&1 || die "a C compiler is required: install it (apt-get install build-essential)"
command -v "${CXX:-c++}" >/dev/null 2>&1 || die "a C++ compiler is required: install it (apt-get install build-essential)"

# --- virtual environment and the package ------------------------------------------
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: creating .venv with $python"
  rm -rf .venv
  "$python" -m venv .venv
fi
stamp=".venv/llamaserve-deps"
# The stamp names the dependencies and where the package is installed from, so that a
# moved or copied checkout (or a venv shared with another one) is installed again.
want="$(cat pyproject.toml | sha256sum | cut -c1-16)$extras $root"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install.sh: installing llamaserve$extras into .venv"
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
  .venv/bin/python -m pip install --disable-pip-version-check -q -e ".$extras"
  echo "$want" > "$stamp"
fi

export LLAMASERVE_ROOT="$root"
exec .venv/bin/llamaserve install ${engines[@]+"${engines[@]}"}
