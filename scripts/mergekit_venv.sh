#!/usr/bin/env bash
# Builds .venv-mergekit: mergekit 0.1.5 in its own venv, for the parity tier (tests/test_mergekit_parity.py).
# torch is installed FIRST, pinned to the project's constraints.txt line, and stays pinned while mergekit resolves,
# so mergekit can never pull another (e.g. CUDA) torch build. Idempotent: exits early when mergekit-yaml is there.
#   bash scripts/mergekit_venv.sh [VENV_DIR]      # default: .venv-mergekit in the repository root
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-mergekit}"
if [[ -x "$venv/bin/mergekit-yaml" ]] && "$venv/bin/python" -c "import mergekit" 2>/dev/null; then
    echo "mergekit venv ready: $venv"
    exit 0
fi
python="${PYTHON:-python3}"
start=$(date +%s)
"$python" -m venv "$venv"
pins="$venv/torch-constraint.txt"
grep '^torch==' "$root/constraints.txt" > "$pins"
torch_pin="$(cat "$pins")"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -c "$pins" "$torch_pin"
"${pip[@]}" -c "$pins" "mergekit==0.1.5"
"$venv/bin/python" -c "import torch, mergekit; print('mergekit venv:', torch.__version__)"
echo "built $venv in $(( $(date +%s) - start )) s"
