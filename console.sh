#!/usr/bin/env bash
# Operator console: ./console.sh start|stop|restart|status|logs [-n N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -x "$root/.venv/bin/llamaserve" ]; then
  echo "console.sh: error: Llamaserve is not installed: run ./runtime/install.sh first" >&2
  exit 1
fi
usage="usage: ./console.sh start|stop|restart|status|logs [-n N] [--no-follow] [--service engine|gateway]

  start     start the engine (unless LLAMA_ENGINE_ENABLED=0) and the gateway (with
            LLAMA_PROXY_ENABLED=1); wait until ready
  stop      stop what runs (SIGTERM; SIGKILL after LLAMA_STOP_TIMEOUT)
  restart   stop, then start (nothing is stopped if the config would be refused)
  status    state, pid, address, model, uptime, whether each answers; the engines
            the gateway sends to (exit 3 when stopped)
  logs      follow a log from its last N lines (default: the engine's, 50)"
case "${1:-}" in
  start|stop|restart|status|logs) ;;
  -h|--help|help) echo "$usage"; exit 0 ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
export LLAMASERVE_ROOT="$root"
exec "$root/.venv/bin/llamaserve" "$@"
