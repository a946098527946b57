#!/usr/bin/env bash
# Users and API keys of the gateway: ./bin/user_management_cli.sh COMMAND [options]
# (./bin/user_management_cli.sh --help lists the commands). The logic is `llamaserve users`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/llamaserve" ]; then
  echo "user_management_cli.sh: error: Llamaserve is not installed: run ./bin/bootstrap_user_cli.sh first" >&2
  exit 1
fi
export LLAMASERVE_ROOT="$root"
exec "$root/.venv/bin/llamaserve" users "$@"
