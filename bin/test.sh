#!/usr/bin/env bash
# Usage: ./bin/test.sh [--fast] [pytest arguments]
#
# Every check of the project: lint (ruff check), format (ruff format --check), types
# (mypy), tests. Plain ./bin/test.sh is the full suite, as CI runs it (.ci/run): it
# installs first (./runtime/install.sh --dev, with the engine the slow tests start),
# then runs every test, the slow tier (the real model, through the real scripts)
# included. ./bin/test.sh --fast installs nothing and runs the same checks on the fast
# tier only, `pytest -m "not slow"`: every test that needs no model and no engine (the
# gateway in process or as a process, on a real PostgreSQL, with the mock engine), in
# two pytest processes at once (tests/gateway and the rest: most of these tests wait
# for processes and timeouts); without .venv it stops and says to run
# ./runtime/install.sh --dev first. Extra arguments go to pytest, in one process, e.g.
# ./bin/test.sh --fast -k auth, or ./bin/test.sh -m slow for the slow tier alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

fast=0
if [ "${1:-}" = "--fast" ]; then
  shift
  fast=1
  for tool in ruff mypy pytest; do
    if [ ! -x ".venv/bin/$tool" ]; then
      echo "test.sh: .venv has no $tool: run ./runtime/install.sh --dev first" >&2
      exit 1
    fi
  done
else
  ./runtime/install.sh --dev --engine llama-server
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ "$fast" = 0 ]; then
  exec .venv/bin/pytest "$@"
elif [ $# -gt 0 ]; then
  exec .venv/bin/pytest -m "not slow" "$@"
fi

# The fast tier in two halves at once; the gateway's half reports after the other's.
gateway_log="$(mktemp)"
trap 'rm -f "$gateway_log"' EXIT
.venv/bin/pytest -m "not slow" tests/gateway >"$gateway_log" 2>&1 &
gateway_half=$!
status=0
.venv/bin/pytest -m "not slow" --ignore=tests/gateway || status=$?
wait "$gateway_half" || status=$?
echo "--- tests/gateway:"
cat "$gateway_log"
exit "$status"
