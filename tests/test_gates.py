"""Gates on a job workspace's evaluation folders (summary.json + samples.jsonl as sarmerge.evaluate writes them):
paired non-inferiority verdicts with intervals, the evidence description, the version tags, hostile inputs, and the
Hub-ready model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pipeline_support import write_params

from sarmerge.errors import SarmergeError
from sarmerge.evaluate.metrics import summarize

SUITES = {"math": "zoo:math", "code": "zoo:code"}


def write_eval(folder: Path, outcomes: dict[str, np.ndarray]) -> None:
    """An evaluation folder in the runner's format: per-sample records and the summary with Wilson intervals."""
    folder.mkdir(parents=True, exist_ok=True)
    records, suites = [], {}
    for suite, correct in outcomes.items():
        for i, c in enumerate(correct):
            records.append({"suite": suite, "id": f"{suite}-{i}", "sample": 0, "completion": "…", "extracted": "1",
                            "verdict": "correct" if c else "incorrect", "correct": bool(c)})
        suites[suite] = summarize([int(c) for c in correct], 1)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"suites": suites, "seeds": {"bootstrap": 0}}))


def make_workspace(tmp: Path, models: dict[str, dict[str, np.ndarray]], **gate) -> Path:
    ws = tmp / "ws"
    job = {"id": "job1", "family": "g", "inputs": "inputs", "base": "base",
           "parents": {"math_s0": {"domain": "math", "model": "models:/g-math/1"},
                       "code_s0": {"domain": "code", "model": "models:/g-code/1"}},
           "suites": sorted(SUITES.values())}
    write_params(ws / "params.yaml", root=tmp / "root", family="g", job=job, gate=gate,
                 merge={"methods": {"sar": {}}, "primary": "sar"})
    (ws / "job.json").write_text(json.dumps({"base": {"uri": "models:/g-base/1"}, "kind": "fusion",
                                             "trigger": "test"}))
    for rel, outcomes in models.items():
        write_eval(ws / "out" / "eval" / rel, outcomes)
    return ws


def outcomes(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    return rng.random(n) < p


def flip(x: np.ndarray, rng: np.random.Generator, lose: float, gain: float = 0.0) -> np.ndarray:
    """A copy that loses `lose` of all problems among the solved ones and gains `gain` among the unsolved."""
    y = x.copy()
    solved, unsolved = np.flatnonzero(x), np.flatnonzero(~x)
    y[rng.choice(solved, round(lose * len(x)), replace=False)] = False
    y[rng.choice(unsolved, round(gain * len(x)), replace=False)] = True
    return y


def family(n: int, seed: int = 0, math_loss: float = 0.0, math_gain: float = 0.0) -> dict[str, dict[str, np.ndarray]]:
    """Base, two parents better than the base on their own suites, and a merge equal to each parent on its suite
    except `math_loss` of the problems lost (and `math_gain` gained)."""
    rng = np.random.default_rng(seed)
    base = {"zoo:math": outcomes(rng, n, 0.3), "zoo:code": outcomes(rng, n, 0.3)}
    math_parent = {"zoo:math": flip(base["zoo:math"], rng, 0.0, 0.2), "zoo:code": base["zoo:code"].copy()}
    code_parent = {"zoo:math": base["zoo:math"].copy(), "zoo:code": flip(base["zoo:code"], rng, 0.0, 0.2)}
    merged = {"zoo:math": flip(math_parent["zoo:math"], rng, math_loss, math_gain),
              "zoo:code": code_parent["zoo:code"].copy()}
    return {"inputs/base": base, "inputs/math_s0": math_parent, "inputs/code_s0": code_parent, "merged/sar": merged}


def collect(ws_path: Path):
    from tasks import evidence
    from tasks.workspace import Workspace

    return evidence.collect(Workspace.open(ws_path), "sar")


def test_a_merge_keeping_both_parents_passes_every_gate_with_intervals(tmp_path):
    from tasks.promote import gate_tags

    ev = collect(make_workspace(tmp_path, family(600)))
    assert ev.verdict == "pass" and [g.verdict for g in ev.gates] == ["pass"] * 4
    assert [g.name for g in ev.gates] == ["noninferior:math_s0", "noninferior:code_s0", "vs_base:zoo:code",
                                          "vs_base:zoo:math"]
    for g in ev.gates:
        assert g.low <= g.difference <= g.high and g.low > -g.margin and g.problems == 600
    tags = gate_tags(ev)
    assert tags["sarmerge.gate"] == "pass"
    assert tags["sarmerge.gate.noninferior_math_s0"].startswith("pass +0.000 [")
    # the description a person reads: scores with intervals, paired differences, each verdict and why
    d = ev.description
    assert "**Scores** (95 % interval)" in d and "**Paired differences**" in d
    assert "| `noninferior:math_s0` | ✅ pass |" in d
    assert "| merged − parent math_s0 |" in d and "| merged − base |" in d
    assert "the interval lies above −margin" in d and "underpowered" not in d
    comparison = json.loads((ev.folder / "comparison.json").read_text())
    assert comparison["verdict"] == "pass" and comparison["bootstrap_seed"] == 0
    assert comparison["paired_differences"]["base"]["zoo:math"]["method"] == "tango-score"


def test_a_15_point_loss_on_400_problems_fails_its_gate(tmp_path):
    ev = collect(make_workspace(tmp_path, family(400, seed=1, math_loss=0.15)))
    gate = next(g for g in ev.gates if g.name == "noninferior:math_s0")
    assert gate.verdict == "fail" and gate.high < -0.03
    assert ev.verdict == "fail" and "| `noninferior:math_s0` | ❌ fail |" in ev.description
    assert "**a gate fails**" in ev.description


def test_3_points_on_64_problems_is_inconclusive_and_says_how_many_would_do(tmp_path):
    ev = collect(make_workspace(tmp_path, family(64, seed=2, math_loss=0.0625, math_gain=0.03125)))
    gate = next(g for g in ev.gates if g.name == "noninferior:math_s0")
    assert gate.difference == pytest.approx(-2 / 64)
    assert gate.verdict == "inconclusive" and gate.underpowered and gate.needed > 64
    assert f"underpowered: needs ≈{gate.needed} problems" in gate.detail
    assert ev.verdict == "inconclusive" and "**inconclusive**" in ev.description


def test_retention_margin_widens_the_margin_when_the_gain_is_large(tmp_path):
    ws = make_workspace(tmp_path, family(400, seed=3), min_retention=0.5)
    ev = collect(ws)
    gate = next(g for g in ev.gates if g.name == "noninferior:math_s0")
    assert gate.margin == pytest.approx(0.5 * 0.2, abs=1e-9)  # half of the parent's 20-point gain
    assert "keep ≥ 50% of its gain" in gate.detail


def test_a_corrupt_samples_file_is_one_clear_error_naming_it(tmp_path):
    ws = make_workspace(tmp_path, family(20))
    samples = ws / "out" / "eval" / "merged" / "sar" / "samples.jsonl"
    lines = samples.read_text().splitlines()
    lines[4] = '{"suite": "zoo:math", "id": "x", "correct": "yes"}'
    samples.write_text("\n".join(lines) + "\n")
    with pytest.raises(SarmergeError, match=r"merged/sar/samples\.jsonl:5: a sample record needs"):
        collect(ws)
    samples.write_text("{not json\n")
    with pytest.raises(SarmergeError, match=r"samples\.jsonl:1: invalid JSON"):
        collect(ws)


def test_evaluations_of_different_problems_are_refused(tmp_path):
    models = family(30)
    models["merged/sar"]["zoo:math"] = models["merged/sar"]["zoo:math"][:20]  # a different limit
    with pytest.raises(SarmergeError, match=r"merged \(sar\) vs parent math_s0 on zoo:math: .*different problems"):
        collect(make_workspace(tmp_path, models))


def test_gate_settings_are_validated(tmp_path):
    from tasks.params import load_params

    for bad, field in (({"confidence": 1.5}, "gate.confidence"), ({"margin": -0.1}, "gate.margin"),
                       ({"min_retention": 2}, "gate.min_retention")):
        with pytest.raises(SarmergeError, match=field.replace(".", r"\.")):
            load_params(write_params(tmp_path / "p.yaml", root=tmp_path, family="x", gate=bad))


def test_model_card_front_matter_is_hub_ready():
    from sarmerge.merge import model_card

    manifest = {"method": "sar", "sarmerge_version": "0.1", "git_revision": "abc", "created_at": "now", "seed": 0,
                "config": {"base_model": "/w/inputs/base", "dtype": "float32", "out_dtype": None, "overrides": [],
                           "parameters": {}, "models": [{"model": "/w/inputs/math_s0", "weight": 1, "density": None,
                                                         "fisher": None},
                                                        {"model": "/w/inputs/code_s0", "weight": 1, "density": None,
                                                         "fisher": None}]}}
    plain = yaml.safe_load(model_card(manifest).split("---\n")[1])
    assert plain == {"base_model": ["/w/inputs/math_s0", "/w/inputs/code_s0", "/w/inputs/base"],
                     "base_model_relation": "merge", "library_name": "transformers",
                     "tags": ["merge", "sarmerge", "sar"]}
    card = model_card(manifest, evaluation={"zoo:math": {"accuracy": 0.25, "ci95": [0.16, 0.37], "problems": 64}},
                      base_models=["models:/m/1", "models:/c/2", "models:/b/1"], model_name="g-merged v3")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["models:/m/1", "models:/c/2", "models:/b/1"]
    (result,) = front["model-index"][0]["results"]
    assert front["model-index"][0]["name"] == "g-merged v3"
    assert result["dataset"] == {"name": "zoo:math", "type": "zoo:math"}
    assert result["metrics"][0]["value"] == 0.25 and "95% CI 0.160-0.370, 64 problems" in result["metrics"][0]["name"]
    assert card.split("---\n", 2)[2].startswith("# Merged model (sar)")


def test_analysis_report_opens_with_a_short_summary_then_the_plots(tmp_path):
    """Two parents and four merges: the summary stays three short lines (the page order, summary → plots → details,
    is checked on a real report in test_ui_browser.py)."""
    import itertools

    from sarmerge.analysis.report import geometry_summary

    labels = ["math", "code", "sar", "ties", "task_arithmetic", "linear"]
    models = {k: {"sparsity": 0.9 + i / 100, "rel_norm": 0.01 * (i + 1), "principal_energy": 0.1,
                  "principal_energy_ratio": 0.5 + i / 10} for i, k in enumerate(labels)}
    pairs = [{"a": a, "b": b, "overlap_ratio": 1.0 + i / 10, "jaccard": 0.1, "jaccard_chance": 0.1, "cosine": 0.01 * i,
              "orth_energy_share": 0.9, "sign_conflict": 0.5, "unshared_energy_a": 0.8, "unshared_energy_b": 0.8}
             for i, (a, b) in enumerate(itertools.combinations(labels, 2))]
    g = {"kind": "geometry", "_dir": str(tmp_path), "base": "base", "models": {k: f"/m/{k}" for k in labels},
         "settings": {"eps": 1e-5, "top_k": 4, "svd": "exact"},
         "model": {"numel": 1000, "tensors": 10, "models": models, "pairs": pairs},
         "layers": {}, "plots": [{"file": "p.png", "title": "Layer heatmap", "caption": "c"}]}
    lines = geometry_summary(g)
    assert len(lines) == 3 and all(len(x) < 200 for x in lines), lines
    assert "90.0% (math) to 95.0% (linear)" in lines[0]
    assert "1.00× (math/code) to 2.40× (task_arithmetic/linear)" in lines[2]
