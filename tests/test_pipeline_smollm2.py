"""Slow tier: a real LLM through the whole DAG. SmolLM2-135M-Instruct specialists (TRL GRPO, bf16) registered on the
embedded stack → watcher → Fisher → merges → evaluation → analysis → DVC → registered versions → gates, with every
step of the step table run and timed (bench/pipeline_smollm2.py does the work; BENCHMARKS.md `pipeline-smollm2`).

Opt in with SARMERGE_SMOLLM2_PIPELINE=1 (~15-25 min on 2 CPUs, so CI leaves it out). SARMERGE_SMOLLM2_FAMILY=DIR uses
a `sarmerge zoo smollm2-grpo` folder; otherwise a 2-step family is built (cached) from the packaged SmolLM2 weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.pipeline]


@pytest.fixture(scope="module")
def family() -> Path:
    if os.environ.get("SARMERGE_SMOLLM2_PIPELINE") != "1":
        pytest.skip("SmolLM2 through the whole DAG takes 15-25 min on 2 CPUs: set SARMERGE_SMOLLM2_PIPELINE=1")
    if os.environ.get("SARMERGE_SMOLLM2_FAMILY"):
        return Path(os.environ["SARMERGE_SMOLLM2_FAMILY"])
    from sarmerge.zoo.smollm2 import SmolGRPOFamilyConfig, TRLGRPOSettings, build_smollm2_grpo_family

    cfg = SmolGRPOFamilyConfig(seeds_per_task=1, test_problems=8, calibration_examples=8,
                               grpo=TRLGRPOSettings(steps=2, prompts=2, group=4))
    return Path(build_smollm2_grpo_family(config=cfg, progress=False)["root"])


def test_smollm2_goes_through_every_step_to_gated_versions(family: Path, tmp_path: Path) -> None:
    from bench.pipeline_smollm2 import report, run
    from tasks.steps import STEPS

    result = run(family, tmp_path, ["sar", "task_arithmetic"], limit=16)
    assert set(result["states"].values()) == {"done"}, result["states"]
    for step in STEPS:
        row = result["steps"].get(step.name)
        assert row is not None and row["states"] == ["success"], (step.name, row)
    assert result["steps"]["fisher"]["instances"] == 2 and result["steps"]["merge"]["instances"] == 2
    assert sorted(v["method"] for v in result["versions"]) == ["sar", "task_arithmetic"]
    for v in result["versions"]:
        assert set(v["scores"]) == {"zoo:math_nl", "zoo:code_mcq_nl"}
        assert v["gate"] in ("pass", "fail", "inconclusive") and v["gates"]
    assert "| `merge` | 2 |" in report(result)
