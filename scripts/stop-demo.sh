#!/usr/bin/env bash
# Stop the embedded demo started by scripts/demo.sh: each service (MLflow, Airflow standalone, relay) is stopped by
# the PID recorded in its state file (its own process group: SIGTERM, then SIGKILL after a grace period).
# Its data (registry, artifacts, workspaces) stays in the demo folder. Usage: bash scripts/stop-demo.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tasks.stack down --dir "${1:-runs/demo}"
