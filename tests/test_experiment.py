"""bench/experiment (`python -m bench.experiment`): the selection machinery on known answers, and the whole experiment
end to end on a cheap family (a real tiny zoo family with a few SFT/GRPO steps, real Fisher, real merges through the
engine, real evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import experiment
from sarmerge.errors import SarmergeError

# A family that builds in seconds: its specialists are barely trained, which is all the plumbing needs.
CHEAP_FAMILY = {"sft": {"steps": 80, "batch_size": 32}, "grpo": {"steps": 3, "prompts": 16, "group": 4, "lr": 1e-3},
                "test_problems": 16, "calibration_examples": 8}


def test_t_interval_matches_hand_computation():
    c = experiment.t_interval([1.0, 2.0, 3.0])
    assert c["mean"] == pytest.approx(2.0)
    assert c["half"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # sd = 1, t(0.975, 2 dof) = 4.303
    assert (c["lo"], c["hi"]) == pytest.approx((2.0 - c["half"], 2.0 + c["half"]))
    assert experiment.t_interval([0.5])["half"] is None  # one seed: no spread to measure


def test_coordinate_ascent_finds_the_separable_optimum_and_respects_the_margin():
    groups = [experiment.KnobGroup("a", [{"a": v} for v in (0, 1, 2)]),
              experiment.KnobGroup("b", [{"b": v} for v in (0, 1, 2)])]

    def score(cfg):
        return -((cfg["a"] - 2) ** 2) - (cfg["b"] - 1) ** 2

    best, trace = experiment.coordinate_ascent(score, {"a": 0, "b": 0}, groups, margin=0.0)
    assert best == {"a": 2, "b": 1}
    assert {t["group"] for t in trace} == {"a", "b"}
    # a gain smaller than the margin never moves the incumbent
    best, _ = experiment.coordinate_ascent(lambda c: 0.001 * c["a"], {"a": 0, "b": 0}, groups, margin=0.01)
    assert best == {"a": 0, "b": 0}


def test_coordinate_ascent_breaks_near_ties_toward_fewer_changed_knobs_and_skips_inapplicable_groups():
    pair = experiment.KnobGroup("a × b", [{"a": 1, "b": 0}, {"a": 1, "b": 1}])
    # {"a": 1, "b": 1} scores best by 0.005 < margin, but changes two knobs: the one-knob option wins
    best, _ = experiment.coordinate_ascent(lambda c: c["a"] + 0.005 * c["b"], {"a": 0, "b": 0}, [pair], margin=0.01)
    assert best == {"a": 1, "b": 0}
    never = experiment.KnobGroup("c", [{"c": 5}], applies=lambda cfg: cfg["a"] == 7)
    best, trace = experiment.coordinate_ascent(lambda c: c.get("c", 0), {"a": 0}, [never], margin=0.0)
    assert best == {"a": 0} and trace == []


def _family(seed: int = 0) -> experiment.Family:
    spec = {
        "math_s0": experiment.Specialist("math_s0", Path("m0"), "math", "math", 0),
        "math_s1": experiment.Specialist("math_s1", Path("m1"), "math", "math", 1),
        "code_s0": experiment.Specialist("code_s0", Path("c0"), "code", "code", 0),
    }
    return experiment.Family(seed, Path("."), Path("base"), spec, {"math": Path("m"), "code": Path("c")})


def test_retained_gain_and_selection_score_by_hand():
    fams = [_family(0), _family(1)]
    assert set(fams[0].settings()) == {"fusion", "enhance_math"}
    assert experiment.scored_pairs(fams[0]) == [("fusion", "code"), ("fusion", "math"), ("enhance_math", "math")]
    refs = {s: {"base": {"math": 0.2, "code": 0.1}, "math_s0": {"math": 0.6, "code": 0.1},
                "math_s1": {"math": 0.4 + 0.2 * s, "code": 0.1}, "code_s0": {"math": 0.2, "code": 0.5}}
            for s in (0, 1)}
    accs = {s: {"fusion": {"math": 0.4, "code": 0.3}, "enhance_math": {"math": 0.7, "code": 0.1}} for s in (0, 1)}
    gains = experiment.retained_gains(fams, refs, accs)
    assert gains[("fusion", "math")] == pytest.approx([0.5, 0.5])  # (0.4 − 0.2) / (0.6 − 0.2)
    assert gains[("fusion", "code")] == pytest.approx([0.5, 0.5])  # (0.3 − 0.1) / (0.5 − 0.1)
    # enhancement: the better parent per seed (0.6, then 0.6) → pooled gain 0.4; merged gain 0.5
    assert gains[("enhance_math", "math")] == pytest.approx([1.25, 1.25])
    score, per_seed = experiment.selection_score(fams, refs, accs)
    assert score == pytest.approx((0.5 + 0.5 + 1.25) / 3)
    assert per_seed == pytest.approx([score, score])


def test_experiment_end_to_end_on_a_cheap_family(tmp_path, monkeypatch):
    monkeypatch.setenv("SARMERGE_ZOO_CACHE", str(tmp_path / "zoo-cache"))
    out, report, plots = tmp_path / "exp", tmp_path / "EXPERIMENTS.md", tmp_path / "plots"
    rc = experiment.main([
        "--out", str(out), "--seeds", "0", "--test-n", "24", "--val-n", "16", "--methods", "task_arithmetic", "sar",
        "--sweep", "quick", "--fisher-examples", "8", "--family", json.dumps(CHEAP_FAMILY), "--threads", "1",
        "--report", str(report), "--plots-dir", str(plots), "--no-progress",
    ])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())

    settings = r["settings"]["settings"]
    assert settings["fusion"] == ["code_s0", "math_s0"]
    assert settings["enhance_math"] == ["math_s0", "math_s1"]
    domains = list(r["settings"]["domains"])
    assert sorted(domains) == ["code", "math"]

    geo = r["geometry"]["summary"]
    for c in geo["sparsity"].values():
        assert 0.0 <= c["mean"] <= 1.0
    for p in geo["pairs"].values():
        assert -1.0 <= p["cosine"]["mean"] <= 1.0
        assert 0.0 <= p["jaccard"]["mean"] <= 1.0

    rows = r["rows"]
    assert {"base", "math_s0", "math_s1", "code_s0", "task_arithmetic", "sar"} <= set(rows)
    for name, row in rows.items():
        cells = row["test"].values() if row["kind"] == "reference" else [
            c for by_domain in row["test"].values() for c in by_domain.values()]
        for c in cells:
            assert 0.0 <= c["mean"] <= 1.0, name
            assert c["n"] == 1 and c["half"] is None  # one seed: no interval claimed
    # the problem sets really have the requested sizes: accuracies are multiples of 1/24
    acc = rows["sar"]["test"]["fusion"]["math"]["mean"]
    assert acc * 24 == pytest.approx(round(acc * 24))

    comps = {(c["block"], c["b"]): c for c in r["comparisons"]}
    assert ("defaults", "task_arithmetic") in comps
    diff = comps[("defaults", "task_arithmetic")]["acc fusion/math"]["mean"]
    assert diff == pytest.approx(acc - rows["task_arithmetic"]["test"]["fusion"]["math"]["mean"])

    sweep = r["sweep"]
    assert sweep["trace"] and len(sweep["configs"]) == 3  # start, fisher_avg, lambda 1.5 (the start is shared)
    scores = {json.dumps(experiment.canonical(c["config"])): c["score"] for c in sweep["configs"]}
    start_score = scores[json.dumps(experiment.canonical(experiment.SAR_START))]
    assert scores[json.dumps(experiment.canonical(sweep["chosen"]))] >= start_score

    # the evaluator cross-check ran on the same problems
    for v in r["evaluator_crosscheck"].values():
        assert 0.0 <= v["direct"] <= 1.0 and 0.0 <= v["sarmerge_evaluate"] <= 1.0

    text = report.read_text()
    for heading in ("## Setup", "## 1. Geometry", "## 2. Every merge method", "### fusion", "### enhance_math",
                    "## 3. SAR knob sweep", "## 4. What held"):
        assert heading in text
    assert "| sar |" in text and "| task_arithmetic |" in text
    for png in ("methods_test.png", "sar_sweep.png"):
        data = (plots / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
    assert f"]({plots.name}/methods_test.png)" in text  # image links relative to the report

    # the report is re-derived from the raw measurements alone, identically
    report.unlink()
    assert experiment.main(["--out", str(out), "--report-only", "--report", str(report), "--plots-dir",
                            str(plots)]) == 0
    assert report.read_text() == text
    # sections other tools append after the keep marker survive a rerun of the report
    from bench.experiment.driver import KEEP_MARKER

    report.write_text(text + "\n" + KEEP_MARKER + "\n## Appended by another tool\nrow\n")
    assert experiment.main(["--out", str(out), "--report-only", "--report", str(report), "--plots-dir",
                            str(plots)]) == 0
    rerun = report.read_text()
    assert rerun.startswith(text.rstrip("\n")) and rerun.endswith(KEEP_MARKER + "\n## Appended by another tool\nrow\n")


# -- the realistic family's experiment (bench/experiment/realistic.py) ---------------------------------------------
def test_paired_difference_interval_and_mcnemar_by_hand():
    from bench.experiment.realistic import paired, wilson

    a, b = [1] * 30 + [0] * 70, [1] * 20 + [0] * 80  # a wins 10 problems, loses none
    r = paired(a, b)
    assert r["diff"] == pytest.approx(0.10) and (r["wins"], r["losses"]) == (10, 0)
    sd = math.sqrt((10 * 0.9**2 + 90 * 0.1**2) / 99)
    assert r["ci95"] == pytest.approx([0.10 - 1.96 * sd / 10, 0.10 + 1.96 * sd / 10], abs=2e-4)
    assert r["mcnemar_p"] == pytest.approx(2 / 2**10, abs=1e-5) and r["verdict"] == "better"
    assert paired(b, a)["verdict"] == "worse" and paired(a, a)["verdict"] == "inconclusive"
    lo, hi = wilson(19, 100)
    assert lo == pytest.approx(0.1251, abs=1e-3) and hi == pytest.approx(0.2777, abs=1e-3)  # Wilson 95 %
    with pytest.raises(SarmergeError):
        paired([1], [1, 0])


def test_realistic_settings_need_two_domains_and_two_seeds(tmp_path):
    from bench.experiment.realistic import settings_of

    def fam(specs):
        sp = {f"{d}_s{k}": experiment.Specialist(f"{d}_s{k}", tmp_path, f"{d}_nl", d, k) for d, k in specs}
        return experiment.Family(0, tmp_path, tmp_path, sp, {})

    full = settings_of(fam([("math", 0), ("code", 0), ("math", 1), ("code", 1)]))
    assert full == {"fusion_s0": ["code_s0", "math_s0"], "fusion_s1": ["code_s1", "math_s1"],
                    "enhance_code": ["code_s0", "code_s1"], "enhance_math": ["math_s0", "math_s1"]}
    with pytest.raises(SarmergeError, match="two seeds"):
        settings_of(fam([("math", 0), ("code", 0)]))


def test_replace_block_keeps_everything_outside_the_markers(tmp_path):
    from bench._report import replace_block

    doc = tmp_path / "E.md"
    doc.write_text("# head\n<!-- a -->\nold\n<!-- /a -->\ntail\n")
    replace_block(doc, "<!-- a -->", "<!-- /a -->", "new\ntext")
    assert doc.read_text() == "# head\n<!-- a -->\nnew\ntext\n<!-- /a -->\ntail\n"
    replace_block(doc, "<!-- b -->", "<!-- /b -->", "appended")
    assert doc.read_text().endswith("tail\n\n<!-- b -->\nappended\n<!-- /b -->\n")
    doc.write_text("<!-- /a --> x <!-- a -->")
    with pytest.raises(SarmergeError, match="in that order"):
        replace_block(doc, "<!-- a -->", "<!-- /a -->", "t")


@pytest.mark.parametrize("content", ["not json", '{"rows": {}}', '{"family": {"grpo": {"steps": 20}, "key": "k"}, '
                                     '"rows": {"sar": {"fusion_mean": 0.3}}}'])
def test_realistic_bad_compare_file_fails_before_any_work(tmp_path, capsys, content):
    from bench.experiment import realistic

    bad = tmp_path / "earlier.json"
    bad.write_text(content)
    doc = tmp_path / "EXPERIMENTS.md"
    doc.write_text("<!-- realistic:begin -->\nold\n<!-- realistic:end -->\n")
    argv = ["--family", str(tmp_path / "no-family"), "--out", str(tmp_path / "out"), "--compare", str(bad),
            "--experiments", str(doc), "--plots-dir", str(tmp_path / "plots")]
    assert realistic.main(argv) != 0
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "plots").exists() and "old" in doc.read_text()


def test_realistic_experiment_end_to_end_on_the_tiny_family(tiny_family, tmp_path):
    """The realistic family's driver on a copy of the tiny family given per-problem scores.json and paired gains
    (what `sarmerge zoo smollm2-grpo` records): real Fisher (three variants), real merges, real scoring, the report
    block, the plot; a rerun resumes from raw.json without redoing a merge."""
    import shutil

    import torch

    from bench.experiment import realistic
    from sarmerge.hf import checkpoint_tokenizer, load_causal_lm
    from sarmerge.zoo.smollm2 import paired_gain, problem_scores
    from sarmerge.zoo.tasks import get_task

    root = tmp_path / "fam"
    shutil.copytree(tiny_family["root"], root)
    fam = json.loads((root / "family.json").read_text())
    n = 12
    problems = {t: get_task(t).generate(n, seed=fam["seed"], split="test") for t in ("math", "code")}

    def scores(path):
        model, tok = load_causal_lm(root / path, dtype=torch.float32, device="cpu"), checkpoint_tokenizer(root / path)
        return {t: problem_scores(model, tok, get_task(t), ps) for t, ps in problems.items()}

    recorded = {"base": scores(fam["base"]["path"])}
    for m in fam["members"]:
        recorded[m["name"]] = {m["task"]: scores(m["path"])[m["task"]]}
        m["own_task_test"] = paired_gain(recorded["base"][m["task"]], recorded[m["name"]][m["task"]])
    (root / "scores.json").write_text(json.dumps({"scores": {k: {t: "".join(str(int(v)) for v in s)
                                                               for t, s in by.items()} for k, by in recorded.items()}}))
    (root / "family.json").write_text(json.dumps(fam))
    doc = tmp_path / "EXPERIMENTS.md"
    doc.write_text("# head\n\n<!-- realistic:begin -->\nold\n<!-- realistic:end -->\ntail\n")
    argv = ["--family", str(root), "--out", str(tmp_path / "out"), "--methods", "task_arithmetic", "sar",
            "--test-n", str(n), "--val-n", "4", "--fisher-examples", "2", "--workers", "1",
            "--experiments", str(doc), "--plots-dir", str(tmp_path / "plots"), "--no-progress"]
    assert realistic.main(argv) == 0
    results = json.loads((tmp_path / "plots" / "smollm2_results.json").read_text())
    assert set(results["settings"]) == {"fusion_s0", "fusion_s1", "enhance_math", "enhance_code"}
    labels = {"task_arithmetic", "sar", *(v[0] for v in realistic.VARIANTS)}
    for method, t in results["tuning"].items():  # candidate − default on the same validation problems
        assert set(t["val_vs_default"]) == set(t["val_means"]) - {method}
        for label, d in t["val_vs_default"].items():
            assert d["diff"] == pytest.approx(t["val_means"][label] - t["val_means"][method], abs=2e-4)
            assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert labels <= set(results["rows"])
    for label, row in results["rows"].items():
        assert set(row["settings"]["fusion_s0"]) == {"math", "code"}
        assert set(row["settings"]["enhance_math"]) == {"math"}
        cell = row["settings"]["fusion_s1"]["math"]
        assert cell["vs_base"]["n"] == n and cell["ci95"][0] <= cell["acc"] <= cell["ci95"][1]
        assert (row["vs_sar"]["fusion"] is None) == (label == "sar")
    work = tmp_path / "out" / f"family-{realistic.family_key(root)}"  # results are kept per family build
    for variant in ("sampled", "empirical", "random"):
        assert (work / "fisher" / f"math_s0-{variant}-2" / "fisher_manifest.json").is_file()
    text = doc.read_text()
    assert text.startswith("# head\n\n<!-- realistic:begin -->\n## 5.")
    assert text.endswith("<!-- realistic:end -->\ntail\n")
    assert (tmp_path / "plots" / "smollm2_methods.png").stat().st_size > 10_000
    raw = (work / "raw.json").read_text()
    shutil.rmtree(work / "fisher")  # a rerun recomputes Fisher but no merge: every score is in raw.json
    earlier = tmp_path / "earlier.json"
    results["rows"] = {k: v for k, v in results["rows"].items() if k != "task_arithmetic"}  # a label it lacked
    earlier.write_text(json.dumps(results))
    assert realistic.main([*argv, "--compare", str(earlier)]) == 0 and (work / "raw.json").read_text() == raw
    again = json.loads((tmp_path / "plots" / "smollm2_results.json").read_text())
    # a resume keeps the timings of what it did not redo and adds what it did (the deleted Fisher stores)
    for phase in ("validation", "test"):
        assert again["seconds"][phase] == results["seconds"][phase]
    assert results["seconds"]["test"] > 0 and again["seconds"]["fisher"] > results["seconds"]["fisher"] > 0
    table = doc.read_text().split("| merge | fusion mean, ")[-1]
    sar_fusion = 100 * results["rows"]["sar · Fisher-free (delta2)"]["vs_sar"]["fusion"]["diff"]
    assert f"{sar_fusion:+.1f} [" in table.split("| sar · Fisher-free (delta2) | ")[1].split("\n")[0]
    assert "| task_arithmetic | " in table and "not run" in table.split("| task_arithmetic | ")[1].split("\n")[0]
