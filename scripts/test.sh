#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k merge`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .          # style and lint (the layering contracts run inside pytest: tests/test_layering.py)
exec .venv/bin/python -m pytest "$@"
