"""bench/gpu_check.sh runs end to end in its CPU dry mode (the GPU run uses the same code on the lent machine)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_prints_every_check(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["errors"] == {}
    assert set(res["fisher"]["rows"]) == {"bare_loop", "fisher_hooks", "fisher_loop"}
    assert set(res["merge"]["rows"]) == {"task_arithmetic", "ties", "sar"}
    assert res["generation"]["identical"] == res["generation"]["of"]
    for needle in ("fisher tiny-llama fisher_hooks", "merge qwen2-tiny", "generate batch"):
        assert needle in proc.stdout


def test_gpu_check_refuses_without_cuda_unless_dry() -> None:
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")})
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
