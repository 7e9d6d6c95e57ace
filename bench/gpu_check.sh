#!/usr/bin/env bash
# The GPU check of issue #15: Fisher (tokens/s, MFU), a 1.5B-shaped CUDA merge vs CPU, batched generation.
#   bash bench/gpu_check.sh          # on the lent GPU machine (≤ 8 min on one H100/H200); results in $OUT
#   bash bench/gpu_check.sh --dry    # tiny CPU smoke run of the same code (CI)
# The GPU machine has Python 3.12 + torch + transformers but no package index: the few wheels the library needs
# beyond those (pydantic & co.) travel in .whl/gpu (made here by `bash bench/gpu_wheels.sh`, carried with the run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3)}
[ -x .venv/bin/python ] && [ "${1:-}" = "--dry" ] && PY=.venv/bin/python
if ! "$PY" -c 'import pydantic, yaml, safetensors, tqdm' 2>/dev/null; then
  [ -d .whl/gpu ] || { echo "gpu_check: pydantic/pyyaml/tqdm missing and no .whl/gpu to install them from" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --find-links .whl/gpu pydantic pyyaml tqdm
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$PY" -m bench.gpu_check "$@"
