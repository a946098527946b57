#!/usr/bin/env bash
# Every check of the project: install (with the dev tools and both engines), lint, format,
# types, tests.
# Extra arguments go to pytest, e.g. ./bin/test.sh -k console
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

./runtime/install.sh --dev --engine llama-server
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
