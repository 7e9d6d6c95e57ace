#!/usr/bin/env bash
# The README's first command: set up (idempotent), then run the embedded demo end to end:
# MLflow (sqlite + local artifacts), Airflow standalone (LocalExecutor, parallelism 4) and the webhook relay on
# loopback ports; the tiny RLVR family is built and uploaded with `sarmerge register`, and the upload alone turns into
# merged, evaluated, registered model versions. Prints the results, the UI URLs and the stop command.
# Options go to `python -m tasks.demo` (--dir, --family DIR, --keep, --timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m tasks.demo "$@"
