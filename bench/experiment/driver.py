"""The experiment's driver: scoring merged models, the runs of every step, and the command line."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench._report import machine
from bench.experiment.design import (
    BASELINE_GRIDS,
    ROOT,
    SAR_GROUPS_FULL,
    SAR_GROUPS_QUICK,
    SAR_START,
    Options,
    compared_methods,
)
from bench.experiment.families import Family, _git_revision, build_family, compute_fishers, read_family
from bench.experiment.report import compact, make_plots, render_report, verdicts
from bench.experiment.statistics import _differs, canonical, coordinate_ascent, selection_score, summarize
from sarmerge.errors import SarmergeError, run_cli

KEEP_MARKER = "<!-- sections below are written by other tools; bench.experiment keeps them -->"

__all__ = [
    "Runner",
    "Scorer",
    "evaluate_config",
    "evaluator_crosscheck",
    "family_geometry",
    "main",
    "merge_config",
    "parse_args",
    "resummarize",
    "run_experiment",
    "write_outputs",
]


log = logging.getLogger("experiment")


class Scorer:
    """Greedy accuracy on a domain's zoo task (`sarmerge.zoo.train.evaluate`, the task's exact-match scorer).

    Problem sets are fixed per (domain, split, n, seed) and shared by every model of a family, so method comparisons
    within a seed are paired on the same problems.
    """

    def __init__(self, tokenizer_dir: Path) -> None:
        from sarmerge.zoo.tiny import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self._problems: dict[tuple[str, str, int, int], list] = {}

    def problems(self, task_name: str, split: str, n: int, seed: int) -> list:
        from sarmerge.zoo.tasks import get_task

        key = (task_name, split, n, seed)
        if key not in self._problems:
            self._problems[key] = get_task(task_name).generate(n, seed=seed, split=split)
        return self._problems[key]

    def score(self, model_dir: Path, tasks: dict[str, str], split: str, n: int, seed: int) -> dict[str, float]:
        from transformers import Qwen2ForCausalLM

        from sarmerge.zoo.tasks import get_task
        from sarmerge.zoo.train import evaluate

        model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return {d: evaluate(model, self.tokenizer, get_task(t), self.problems(t, split, n, seed))
                for d, t in tasks.items()}


def merge_config(fam: Family, setting: str, method: str, params: dict[str, Any],
                 fishers: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """The `sarmerge merge` config of one method on one setting (SAR: support Fisher; `fisher`: dense Fisher)."""
    from sarmerge.methods import get_method

    parents = fam.settings()[setting]
    spec = get_method(method)
    pvalid = spec.params.model_validate(params)
    wants_fisher = spec.needs_fisher(pvalid)
    layout = "dense" if spec.fisher == "dense" else "support"
    if method == "slerp":  # SLERP interpolates from its base_model to the one other model: parent A -> parent B
        return {"method": method, "base_model": str(parents[0].path), "models": [{"model": str(parents[1].path)}],
                "parameters": params, "seed": fam.seed, "tokenizer": str(fam.base)}
    models = [{"model": str(p.path), **({"fisher": str(fishers[p.label][layout])} if wants_fisher else {})}
              for p in parents]
    return {"method": method, "base_model": str(fam.base), "models": models, "parameters": params, "seed": fam.seed}


@dataclass
class Runner:
    """Merges through the engine into a scratch directory, scores the result, deletes it; memoises the scores."""

    families: list[Family]
    fishers: dict[int, dict[str, dict[str, Path]]]
    scorer: Scorer
    scratch: Path
    n: dict[str, int]  # split -> problems per domain
    cache: dict[str, dict[str, float]] = field(default_factory=dict)
    merges: int = 0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0

    def key(self, fam: Family, setting: str, method: str, params: dict[str, Any], split: str) -> str:
        return json.dumps([fam.seed, setting, method, canonical(params), split, self.n[split]], sort_keys=True)

    def run(self, fam: Family, setting: str, method: str, params: dict[str, Any], split: str) -> dict[str, float]:
        from sarmerge.config import parse_config
        from sarmerge.merge import run_merge

        k = self.key(fam, setting, method, params, split)
        if k in self.cache:
            return self.cache[k]
        cfg = parse_config(merge_config(fam, setting, method, params, self.fishers[fam.seed]),
                           source=f"{method} on {setting}")
        out = self.scratch / "merged"
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            run_merge(cfg, out, overwrite=True, progress=False)
        t1 = time.perf_counter()
        scores = self.scorer.score(out, fam.domain_tasks(), split, self.n[split], fam.seed)
        self.eval_seconds += time.perf_counter() - t1
        self.merge_seconds += t1 - t0
        self.merges += 1
        shutil.rmtree(out, ignore_errors=True)
        self.cache[k] = scores
        return scores


# -- the experiment ---------------------------------------------------------------------------------------------------
def evaluate_config(runner: Runner, families: list[Family], method: str, params: dict[str, Any], split: str
                    ) -> dict[int, dict[str, dict[str, float]]]:
    """accs[seed][setting][domain] of one method config on every family and setting."""
    return {f.seed: {s: runner.run(f, s, method, params, split) for s in f.settings()} for f in families}


def run_experiment(opt: Options) -> dict[str, Any]:
    torch.set_num_threads(opt.threads)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    opt.out.mkdir(parents=True, exist_ok=True)

    # 1. families and Fisher
    families: list[Family] = []
    build_seconds: dict[int, float | None] = {}
    fishers: dict[int, dict[str, dict[str, Path]]] = {}
    zoo_code: dict[int, str] = {}
    t0 = time.perf_counter()
    for seed in opt.seeds:
        fam, secs, zoo_code[seed] = build_family(opt.out / f"family-s{seed}", seed, overrides=opt.family,
                                                 rebuild=opt.rebuild, progress=opt.progress)
        families.append(fam)
        build_seconds[seed] = secs
    timings["families"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for fam in families:
        fishers[fam.seed] = compute_fishers(fam, opt.out / "fisher", examples=opt.fisher_examples,
                                            progress=opt.progress)
    timings["fisher"] = time.perf_counter() - t0
    shape = sorted((d, len(g)) for d, g in families[0].by_domain().items())
    for fam in families[1:]:
        if sorted((d, len(g)) for d, g in fam.by_domain().items()) != shape:
            raise SarmergeError(f"{fam.root}: family differs in shape from {families[0].root}")

    # 2. geometry
    t0 = time.perf_counter()
    geometry = {fam.seed: family_geometry(fam) for fam in families}
    timings["geometry"] = time.perf_counter() - t0

    # 3. references: base and parents on val and test
    scorer = Scorer(families[0].base)
    runner = Runner(families, fishers, scorer, opt.out / "scratch", {"val": opt.val_n, "test": opt.test_n})
    t0 = time.perf_counter()
    refs: dict[str, dict[int, dict[str, dict[str, float]]]] = {"val": {}, "test": {}}
    for split in ("val", "test"):
        for fam in families:
            models = {"base": fam.base, **{label: s.path for label, s in fam.specialists.items()}}
            refs[split][fam.seed] = {name: scorer.score(path, fam.domain_tasks(), split, runner.n[split], fam.seed)
                                     for name, path in models.items()}
    timings["references"] = time.perf_counter() - t0
    crosscheck = evaluator_crosscheck(families[0], scorer, opt.test_n)

    def val_score(method: str, params: dict[str, Any]) -> tuple[float, list[float], dict]:
        accs = evaluate_config(runner, families, method, params, "val")
        score, per_seed = selection_score(families, refs["val"], accs)
        return score, per_seed, accs

    # 4. validation: SAR sweep and baseline tuning
    t0 = time.perf_counter()
    sweep_log: dict[str, dict[str, Any]] = {}
    groups = SAR_GROUPS_FULL if opt.sweep == "full" else SAR_GROUPS_QUICK
    sweep_bar = tqdm(desc="sar sweep (val)", unit="config", disable=not opt.progress or opt.sweep == "none")

    def sar_eval(cfg: dict[str, Any]) -> float:
        key = json.dumps(canonical(cfg))
        if key not in sweep_log:
            score, per_seed, accs = val_score("sar", cfg)
            sweep_log[key] = {"config": cfg, "score": score, "per_seed": per_seed, "accuracy": accs}
            sweep_bar.update(1)
        return sweep_log[key]["score"]

    if opt.sweep != "none" and "sar" in opt.methods:
        chosen, trace = coordinate_ascent(sar_eval, SAR_START, groups)
    else:
        chosen, trace = dict(SAR_START), []
    sweep_bar.close()
    timings["sar_sweep"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned: dict[str, dict[str, Any]] = {}
    if opt.tune_baselines:
        grids = {m: g for m, g in BASELINE_GRIDS.items() if m in opt.methods}
        bar = tqdm(total=sum(map(len, grids.values())), desc="baseline tuning (val)", unit="config",
                   disable=not opt.progress)
        for method, grid in grids.items():
            tried = []
            for cfg in grid:
                score, per_seed, _ = val_score(method, cfg)
                tried.append({"config": cfg, "score": score, "per_seed": per_seed})
                bar.update(1)
            best = max(tried, key=lambda x: x["score"])
            tuned[method] = {"chosen": best["config"], "tried": tried}
        bar.close()
    timings["baseline_tuning"] = time.perf_counter() - t0

    # 5. test
    t0 = time.perf_counter()
    from sarmerge.methods import get_method
    from sarmerge.methods.sar import SarParams

    code_defaults = SarParams().model_dump(by_alias=True)
    variants: list[tuple[str, str, dict[str, Any]]] = [(m, m, {}) for m in opt.methods]
    if "sar" in opt.methods and opt.sweep != "none" and any(_differs(code_defaults.get(k), v)
                                                             for k, v in chosen.items()):
        variants.append(("sar (val-chosen)", "sar", chosen))  # only when it is not what the code defaults give
    variants += [(f"{m} (val-tuned)", m, t["chosen"]) for m, t in tuned.items()]
    test_rows: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(variants), desc="test", unit="method", disable=not opt.progress)
    for name, method, params in variants:
        accs = evaluate_config(runner, families, method, params, "test")
        resolved = get_method(method).params.model_validate(params).model_dump(by_alias=True)
        test_rows[name] = {"method": method, "params": params, "resolved": resolved, "accuracy": accs}
        bar.update(1)
    bar.close()
    timings["test"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    shutil.rmtree(runner.scratch, ignore_errors=True)

    raw = {
        "options": {"test_n": opt.test_n, "val_n": opt.val_n, "methods": opt.methods, "sweep": opt.sweep,
                    "tune_baselines": opt.tune_baselines, "fisher_examples": opt.fisher_examples,
                    "family": opt.family},
        "seeds": [f.seed for f in families],
        "geometry": geometry, "refs": refs, "test_rows": test_rows, "sweep_log": sweep_log, "trace": trace,
        "chosen": chosen, "tuned": tuned, "code_defaults": code_defaults,
        "run": {
            "machine": machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": opt.threads,
            "git_revision": _git_revision(),
            "zoo_code_sha256": zoo_code,  # per family seed: which zoo code built it
            "family_build_seconds": build_seconds,
            "family_meta": {f.seed: f.meta for f in families},
            "evaluator_crosscheck": crosscheck,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "merges": runner.merges,
            "merge_seconds": round(runner.merge_seconds, 1),
            "eval_seconds": round(runner.eval_seconds, 1),
        },
    }
    # everything measured, so that the summary and report can be re-derived (--report-only) without re-running
    (opt.out / "raw.json").write_text(json.dumps(raw, default=str) + "\n")
    results = summarize(raw, families)
    (opt.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_outputs(results, opt)
    return results


def _int_keys(x: Any) -> Any:
    """JSON turned the seed keys into strings: turn them back (no setting, domain or model name is all digits)."""
    if isinstance(x, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_int_keys(v) for v in x]
    return x


def resummarize(out: Path) -> dict[str, Any]:
    """The summary of an earlier run from OUT/raw.json and its families (for --report-only)."""
    try:
        raw = _int_keys(json.loads((out / "raw.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise SarmergeError(f"{out / 'raw.json'}: cannot read the raw results of a run: {e}") from e
    return summarize(raw, [read_family(out / f"family-s{seed}", seed) for seed in raw["seeds"]])


def write_outputs(results: dict[str, Any], opt: Options) -> None:
    """Plots, the markdown report and the committed compact copy of the results."""
    if opt.plots_dir is not None:
        results["plots"] = make_plots(results, opt.plots_dir)
        (opt.plots_dir / "results.json").write_text(json.dumps(compact(results), indent=1, default=str) + "\n")
    if opt.report is not None:
        opt.report.parent.mkdir(parents=True, exist_ok=True)
        # sections other tools write (bench.geometry_literature) follow KEEP_MARKER and survive a rerun
        old = opt.report.read_text() if opt.report.exists() else ""
        kept = old[old.index(KEEP_MARKER):] if KEEP_MARKER in old else ""
        opt.report.write_text(render_report(results, opt).rstrip("\n") + ("\n\n\n" + kept if kept else "\n"))


def family_geometry(fam: Family) -> dict[str, Any]:
    from sarmerge.analysis.geometry import analyze_geometry

    labels = sorted(fam.specialists)
    g = analyze_geometry(fam.base, [fam.specialists[x].path for x in labels], names=labels, eps=1e-5,
                         progress=False)
    keep_pair = ("jaccard", "jaccard_chance", "overlap_ratio", "cosine", "sign_conflict", "unshared_energy_a",
                 "unshared_energy_b", "intersection")
    return {
        "numel": g["model"]["numel"],
        "models": {k: {m: v[m] for m in ("sparsity", "density", "rel_norm", "principal_energy_ratio")}
                   for k, v in g["model"]["models"].items()},
        "pairs": [{"a": p["a"], "b": p["b"], **{k: p[k] for k in keep_pair}} for p in g["model"]["pairs"]],
        "modules": {mod: {k: v["sparsity"] for k, v in d["models"].items()} for mod, d in g["modules"].items()},
    }


def evaluator_crosscheck(fam: Family, scorer: Scorer, n: int) -> dict[str, Any]:
    """Score the base of the first family with `sarmerge evaluate` (zoo suites, HF backend) too; the direct scorer
    used everywhere else must agree with it on the same test problems."""
    from sarmerge.evaluate import evaluate

    tasks = fam.domain_tasks()
    with contextlib.redirect_stderr(io.StringIO()):
        summary = evaluate(fam.base, [f"zoo:{t}" for t in tasks.values()], limit=n, seed=fam.seed, progress=False)
    direct = scorer.score(fam.base, tasks, "test", n, fam.seed)
    return {d: {"sarmerge_evaluate": summary["suites"][f"zoo:{t}"]["accuracy"], "direct": direct[d]}
            for d, t in tasks.items()}


# -- CLI --------------------------------------------------------------------------------------------------------------
def parse_args(argv: Iterable[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.experiment", description=sys.modules["bench.experiment"].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "experiment",
                   help="working directory: families (cached), Fisher stores, results.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="family seeds (default 0–4)")
    p.add_argument("--test-n", type=int, default=500, help="test problems per domain (default 500)")
    p.add_argument("--val-n", type=int, default=200, help="validation problems per domain (default 200)")
    p.add_argument("--methods", nargs="+", default=compared_methods(), help="merge methods (default: all compared)")
    p.add_argument("--sweep", choices=["full", "quick", "none"], default="full", help="SAR knob sweep on validation")
    p.add_argument("--no-tune-baselines", dest="tune_baselines", action="store_false",
                   help="skip tuning the baselines' knobs on validation")
    p.add_argument("--fisher-examples", type=int, default=128)
    p.add_argument("--rebuild", action="store_true",
                   help="rebuild the families even when OUT holds ones built with the same configuration")
    p.add_argument("--family", type=json.loads, default={}, metavar="JSON",
                   help="TinyFamilyConfig overrides for the families, e.g. '{\"sft\": {\"steps\": 50}}' "
                        "(default: the zoo's defaults; families are cached by the zoo, keyed by code and config)")
    p.add_argument("--report", type=Path, default=ROOT / "EXPERIMENTS.md", help="markdown report ('' = none)")
    p.add_argument("--plots-dir", type=Path, default=ROOT / "docs" / "experiments", help="plots ('' = none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads run far slower)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the report and plots from OUT/results.json without running anything")
    a = p.parse_args(list(argv) if argv is not None else None)
    from sarmerge.methods import get_method

    for m in a.methods:
        get_method(m)
    if a.test_n < 1 or a.val_n < 1:
        p.error("--test-n and --val-n must be >= 1")
    return Options(out=a.out, seeds=a.seeds, test_n=a.test_n, val_n=a.val_n, methods=a.methods, sweep=a.sweep,
                   tune_baselines=a.tune_baselines, fisher_examples=a.fisher_examples, family=a.family,
                   rebuild=a.rebuild, progress=a.progress, report=a.report if str(a.report) else None,
                   plots_dir=a.plots_dir if str(a.plots_dir) else None, threads=a.threads, report_only=a.report_only)


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    def body() -> None:
        opt = parse_args(argv)
        if opt.report_only:
            results = resummarize(opt.out)
            (opt.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
            write_outputs(results, opt)
        else:
            results = run_experiment(opt)
        for line in verdicts(results):
            print(line)
        print(f"results: {opt.out / 'results.json'}" + (f"; report: {opt.report}" if opt.report else ""))

    return run_cli("bench.experiment", body)
