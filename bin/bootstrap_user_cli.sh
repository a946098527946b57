#!/usr/bin/env bash
# Prepares what ./bin/user_management_cli.sh needs, then checks the database connection.
# Safe to run again: it installs Llamaserve only when .venv lacks it, creates .env from
# .env.example only when .env is missing, and starts the private PostgreSQL cluster
# (runtime/pgdata) only when .env names no POSTGRES_AUTH_HOST and it is not running.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ ! -x .venv/bin/llamaserve ]; then
  echo "bootstrap_user_cli.sh: Llamaserve is not installed: running ./runtime/install.sh"
  ./runtime/install.sh
fi
if [ ! -f .env ]; then
  (umask 077 && cp .env.example .env)  # never readable by others, not even for a moment
  chmod 600 .env
  echo "bootstrap_user_cli.sh: created .env from .env.example (database settings: POSTGRES_AUTH_*)"
fi
export LLAMASERVE_ROOT="$root"
exec .venv/bin/llamaserve users check
