#!/usr/bin/env bash
# Wheels the GPU machine lacks (Python 3.12, no index): what `import sarmerge.merge, sarmerge.fisher` needs beyond
# torch/transformers/numpy/safetensors. Downloads into .whl/gpu (git-ignored; pass it as `carry` to the device run).
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -iE "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" constraints.txt; }
.venv/bin/python -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl/gpu \
  "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin typing-extensions)" "$(pin pyyaml)" "$(pin tqdm)"
du -sh .whl/gpu
