#!/usr/bin/env bash
# Operator console: ./console.sh start|stop|restart|status|logs [-n N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -x "$root/.venv/bin/llamaserve" ]; then
  echo "console.sh: error: Llamaserve is not installed: run ./runtime/install.sh first" >&2
  exit 1
fi
case "${1:-}" in
  start|stop|restart|status|logs) ;;
  *) echo "usage: ./console.sh start|stop|restart|status|logs [-n N] [--no-follow]" >&2; exit 2 ;;
esac
export LLAMASERVE_ROOT="$root"
exec "$root/.venv/bin/llamaserve" "$@"
