"""The sparsity-curse experiment (issue 8, SPEC §1, §4.6, §9): does SAR-Merging beat standard merging on real RLVR
checkpoints, and which SAR knobs work best? One command regenerates the families, the numbers and the report:

    .venv/bin/python bench/experiment.py                       # full run: EXPERIMENTS.md + docs/experiments/*.png
    .venv/bin/python bench/experiment.py --seeds 0 --test-n 50 --val-n 40 --methods task_arithmetic sar \
        --sweep quick --no-tune-baselines --report /tmp/EXP.md --plots-dir /tmp/plots   # a smoke run

Steps, per family seed s (each a tiny RLVR family from `sarmerge zoo tiny`: an SFT'd base and GRPO specialists):
1. build (or reuse) the family; Fisher of every specialist on its own domain's calibration prompts with
   `sarmerge fisher` (support of the base for SAR, dense for Fisher merging);
2. update geometry of the specialists (sparsity, overlap vs chance, cosine, sign conflicts);
3. greedy accuracy of the base and the parents on every domain's validation and test problems;
4. validation only: a sweep over SAR's knobs (greedy coordinate ascent from SPEC §4.6's reconstruction) and a small
   tuning grid for the baselines' own knobs, both selected by the same rule (see `selection_score`);
5. test: every merge method with its code defaults, SAR's sweep choice and the tuned baselines, on fusion (one
   specialist per domain) and single-task enhancement (two seeds of one domain), every merged model scored on every
   domain.
Intervals are 95 % Student-t intervals over family seeds (problem sets are drawn per seed, so they cover both the
training-seed and the problem-sampling variance); method comparisons are paired over seeds.
Merged models go through the real engine (`run_merge` with the `sarmerge.config` schema) and are deleted once scored.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench._report import machine  # noqa: E402
from sarmerge.errors import SarmergeError  # noqa: E402

log = logging.getLogger("experiment")

# The merge methods compared, with the code defaults of each (slerp interpolates between the two parents).
ALL_METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della",
               "model_stock", "slerp", "ram", "ram_plus", "fisher", "sar"]
# The sweep starts from SPEC §4.6's reconstruction, not from the code's current defaults, so that re-running the
# experiment after the defaults were updated reproduces the same sweep.
SAR_START: dict[str, Any] = {"epsilon": 1e-5, "sensitivity": "fisher_delta2", "arbitration": "hard", "density": 1.0,
                             "rescale": "norm", "r": 2.0, "lambda": 1.0}


@dataclass(frozen=True)
class KnobGroup:
    """Knobs the coordinate ascent varies together; `applies(incumbent)` skips a group that cannot matter."""

    name: str
    options: list[dict[str, Any]]
    applies: Callable[[dict[str, Any]], bool] = lambda cfg: True


SAR_DENSITIES = [1.0, 0.9, 0.7, 0.5, 0.3]
SAR_RESCALES = ["norm", "dare", "ram_plus", "none"]
SAR_GROUPS_FULL: list[KnobGroup] = [
    KnobGroup("epsilon", [{"epsilon": e} for e in (0.0, 1e-5, 1e-4, 1e-3)]),
    KnobGroup("sensitivity", [{"sensitivity": s} for s in ("fisher_delta2", "fisher", "delta2")]),
    KnobGroup("arbitration", [{"arbitration": a} for a in ("hard", "fisher_avg", "hybrid")]),
    # at density 1 the norm/dare/none rescales are all the identity: keep one of them
    KnobGroup("density × rescale", [{"density": 1.0, "rescale": "norm"}, {"density": 1.0, "rescale": "ram_plus"}]
              + [{"density": d, "rescale": r} for d in SAR_DENSITIES[1:] for r in SAR_RESCALES]),
    KnobGroup("r", [{"r": r} for r in (1.5, 2.0, 3.0)], applies=lambda cfg: cfg["rescale"] == "ram_plus"),
    KnobGroup("lambda", [{"lambda": v} for v in (0.7, 1.0, 1.3, 1.6, 2.0)]),
]
SAR_GROUPS_QUICK: list[KnobGroup] = [
    KnobGroup("arbitration", [{"arbitration": a} for a in ("hard", "fisher_avg")]),
    KnobGroup("lambda", [{"lambda": v} for v in (1.0, 1.5)]),
]
# Baselines get their own main knobs tuned on validation too (same rule), so the comparison is not tuned-vs-default.
BASELINE_GRIDS: dict[str, list[dict[str, Any]]] = {
    "task_arithmetic": [{"lambda": v} for v in (0.5, 0.8, 1.0, 1.3)],
    "ties": [{"density": d, "lambda": v} for d in (0.2, 0.5) for v in (1.0, 1.5)],
    "dare_linear": [{"density": d, "lambda": v} for d in (0.5, 0.8) for v in (0.8, 1.0)],
    "dare_ties": [{"density": d, "lambda": v} for d in (0.5, 0.8) for v in (1.0, 1.5)],
    "ram": [{"lambda": v} for v in (0.8, 1.0, 1.3)],
    "ram_plus": [{"r": r} for r in (1.5, 2.0, 3.0)],
}
# The ascent leaves the incumbent only for a validation gain above this (2 % of the specialists' RL gain, about a
# third of an accuracy point here); options within it of the group's best count as tied and the one changing the
# fewest knobs wins, so noise does not drag the defaults around.
MOVE_MARGIN = 0.02
DENOMINATOR_FLOOR = 0.01  # retained-gain denominators below this (no measurable RL gain) are floored
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# -- statistics -------------------------------------------------------------------------------------------------------
def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % Student-t interval over seeds (half-width 0 for one value: no spread measurable)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half": None, "lo": None, "hi": None, "n": n, "values": list(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "half": half, "lo": mean - half, "hi": mean + half, "n": n, "values": list(values)}


# -- the family -------------------------------------------------------------------------------------------------------
@dataclass
class Specialist:
    label: str
    path: Path
    task: str
    domain: str
    seed: int


@dataclass
class Family:
    seed: int
    root: Path
    base: Path
    specialists: dict[str, Specialist]
    calibration: dict[str, Path]
    meta: dict[str, Any] = field(default_factory=dict)

    def by_domain(self) -> dict[str, list[Specialist]]:
        out: dict[str, list[Specialist]] = {}
        for s in sorted(self.specialists.values(), key=lambda s: (s.domain, s.seed, s.label)):
            out.setdefault(s.domain, []).append(s)
        return out

    def settings(self) -> dict[str, list[Specialist]]:
        """fusion: the first specialist of every domain; enhance_<d>: the first two seeds of domain d."""
        groups = self.by_domain()
        out = {"fusion": [g[0] for g in groups.values()]} if len(groups) >= 2 else {}
        for d, g in groups.items():
            if len(g) >= 2:
                out[f"enhance_{d}"] = g[:2]
        return out

    def domain_tasks(self) -> dict[str, str]:
        return {d: g[0].task for d, g in self.by_domain().items()}


def read_family(root: Path, seed: int) -> Family:
    """Read DIR/family.json as written by `sarmerge zoo tiny` (`sarmerge.zoo.family`; paths relative to DIR)."""
    from sarmerge.zoo.family import load_family

    meta = load_family(root)
    where = root / "family.json"
    try:
        base = root / meta["base"]["path"]
        specialists = {m["name"]: Specialist(label=m["name"], path=root / m["path"], task=m["task"],
                                             domain=m["domain"], seed=int(m["seed"])) for m in meta["members"]}
        calibration = {d: root / p for d, p in meta["calibration"].items()}
    except (KeyError, TypeError) as e:
        raise SarmergeError(f"{where}: unexpected family description (missing {e})") from e
    fam = Family(seed=seed, root=root, base=base, specialists=specialists, calibration=calibration, meta=meta)
    for d in fam.by_domain():
        if d not in calibration:
            raise SarmergeError(f"{where}: no calibration file for domain {d!r}")
    if "fusion" not in fam.settings():
        raise SarmergeError(f"{where}: fusion needs specialists of at least two domains")
    return fam


def family_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    """`TinyFamilyConfig` keyword overrides from plain JSON (nested `sft` / `grpo` dicts become their configs)."""
    from sarmerge.zoo.train import GRPOConfig, SFTConfig

    out = dict(spec)
    if isinstance(out.get("sft"), dict):
        out["sft"] = SFTConfig(**out["sft"])
    if isinstance(out.get("grpo"), dict):
        out["grpo"] = GRPOConfig(**out["grpo"])
    if isinstance(out.get("tasks"), list):
        out["tasks"] = tuple(out["tasks"])
    return out


def build_family(root: Path, seed: int, *, overrides: dict[str, Any], rebuild: bool, progress: bool
                 ) -> tuple[Family, float | None, str]:
    """The tiny zoo family of `seed` in `root`: reused when `root` holds one built with the same configuration (the
    stamp ROOT.build.json records it and the zoo code it was built with), else built (or copied from the zoo's own
    cache). Returns the family, the seconds spent building (None when reused) and the zoo code fingerprint.

    Reuse goes by configuration, not by the zoo's code hash, so edits to the zoo that do not change the weights
    (logging, device plumbing) do not force a rebuild; the report states every family's zoo code fingerprint, and
    `--rebuild` starts afresh.
    """
    from sarmerge.zoo.family import TinyFamilyConfig, build_tiny_family, code_fingerprint

    kwargs = family_overrides(overrides)
    config = json.loads(json.dumps(dataclasses.replace(TinyFamilyConfig(), **kwargs, seed=seed).as_dict()))
    stamp = root.with_name(root.name + ".build.json")
    if not rebuild and (root / "family.json").exists() and stamp.exists():
        recorded = json.loads(stamp.read_text())
        if recorded.get("config") == config:
            return read_family(root, seed), None, recorded["zoo_code"]
    code = code_fingerprint()
    t0 = time.perf_counter()
    build_tiny_family(root, seed=seed, overwrite=True, progress=progress, **kwargs)
    stamp.write_text(json.dumps({"config": config, "zoo_code": code, "git_revision": _git_revision()}) + "\n")
    return read_family(root, seed), time.perf_counter() - t0, code


def compute_fishers(fam: Family, store: Path, *, examples: int, progress: bool) -> dict[str, dict[str, Path]]:
    """`sarmerge fisher` per specialist on its own domain's calibration data: layout -> path.

    Cached under `store/<family key>/`: the key hashes the family's code and configuration, so a rebuilt family
    never meets the Fisher of an older one.
    """
    from sarmerge.fisher import run_fisher
    from sarmerge.zoo.tasks import get_task

    out: dict[str, dict[str, Path]] = {}
    for label, s in fam.specialists.items():
        out[label] = {}
        for layout in ("support", "dense"):
            path = store / str(fam.meta.get("key", f"seed{fam.seed}")) / f"{label}-{layout}-{examples}"
            if not (path / "fisher_manifest.json").exists():
                run_fisher(s.path, fam.calibration[s.domain], path, mode="sampled", examples=examples,
                           support_of=fam.base if layout == "support" else None,
                           max_new_tokens=get_task(s.task).max_answer_chars + 2, seed=fam.seed, overwrite=True,
                           progress=progress)
            out[label][layout] = path
    return out


# -- evaluation -------------------------------------------------------------------------------------------------------
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


def canonical(params: dict[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in sorted(params)}


def describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in canonical(params).items()) \
        or "defaults"


# -- the selection rule -----------------------------------------------------------------------------------------------
def scored_pairs(fam: Family) -> list[tuple[str, str]]:
    """(setting, domain) pairs that measure retained RL skill: every domain in fusion, the own domain in enhancement."""
    out = []
    for setting, parents in fam.settings().items():
        if setting == "fusion":
            out += [(setting, p.domain) for p in parents]
        else:
            out.append((setting, parents[0].domain))
    return out


def reference_accuracy(fam: Family, refs: dict[str, dict[str, float]], setting: str, domain: str) -> float:
    """What a merge should retain: the domain's specialist (fusion) or the better of the two parents (enhancement)."""
    parents = [p for p in fam.settings()[setting] if p.domain == domain]
    return max(refs[p.label][domain] for p in parents)


def retained_gains(families: list[Family], refs: dict[int, dict[str, dict[str, float]]],
                   accs: dict[int, dict[str, dict[str, float]]]) -> dict[tuple[str, str], list[float]]:
    """Per scored (setting, domain) and per seed: (acc_merged − acc_base) / mean over seeds of (acc_ref − acc_base).

    The denominator is pooled over seeds (and floored at DENOMINATOR_FLOOR) so one seed with a small RL gain cannot
    blow the ratio up. 1 = the merge kept the whole RL gain of the parent, 0 = no better than the base.
    `refs[seed][model][domain]`: accuracies of "base" and the parents; `accs[seed][setting][domain]`: the merge's.
    """
    out: dict[tuple[str, str], list[float]] = {}
    for setting, domain in scored_pairs(families[0]):
        gain_ref = sum(reference_accuracy(f, refs[f.seed], setting, domain) - refs[f.seed]["base"][domain]
                       for f in families) / len(families)
        den = max(gain_ref, DENOMINATOR_FLOOR)
        out[(setting, domain)] = [(accs[f.seed][setting][domain] - refs[f.seed]["base"][domain]) / den
                                  for f in families]
    return out


def selection_score(families: list[Family], refs: dict[int, dict[str, dict[str, float]]],
                    accs: dict[int, dict[str, dict[str, float]]]) -> tuple[float, list[float]]:
    """The validation selection rule: mean over scored (setting, domain) pairs of the retained RL gain; per seed too."""
    gains = retained_gains(families, refs, accs)
    per_seed = [sum(v[i] for v in gains.values()) / len(gains) for i in range(len(families))]
    return sum(per_seed) / len(per_seed), per_seed


# -- the experiment ---------------------------------------------------------------------------------------------------
@dataclass
class Options:
    out: Path
    seeds: list[int]
    test_n: int
    val_n: int
    methods: list[str]
    sweep: str
    tune_baselines: bool
    fisher_examples: int
    family: dict[str, Any]
    rebuild: bool
    progress: bool
    report: Path | None
    plots_dir: Path | None
    threads: int
    report_only: bool = False


def evaluate_config(runner: Runner, families: list[Family], method: str, params: dict[str, Any], split: str
                    ) -> dict[int, dict[str, dict[str, float]]]:
    """accs[seed][setting][domain] of one method config on every family and setting."""
    return {f.seed: {s: runner.run(f, s, method, params, split) for s in f.settings()} for f in families}


def coordinate_ascent(evaluate: Callable[[dict[str, Any]], float], start: dict[str, Any], groups: list[KnobGroup],
                      *, passes: int = 2, margin: float = MOVE_MARGIN) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy coordinate ascent: per knob group, try every option with the other knobs at the incumbent.

    The group's winner is, among the options scoring within `margin` of the group's best, the one changing the fewest
    knobs of the incumbent (then the higher score); the incumbent moves to it only when it beats the incumbent by more
    than `margin`. Stops after `passes` or after a pass without a move.
    `evaluate(config) -> score` is expected to memoise; the trace lists every (pass, group, config, score) visited.
    """
    incumbent = dict(start)
    best = evaluate(incumbent)
    trace: list[dict[str, Any]] = []
    for p in range(passes):
        moved = False
        for group in groups:
            if not group.applies(incumbent):
                continue
            scored = []
            for partial in group.options:
                cfg = {**incumbent, **partial}
                score = evaluate(cfg)
                scored.append((score, cfg))
                trace.append({"pass": p + 1, "group": group.name, "config": cfg, "score": score,
                              "incumbent": cfg == incumbent})
            top = max(score for score, _ in scored)
            near = [(sum(cfg[k] != incumbent.get(k) for k in cfg), -score, i)
                    for i, (score, cfg) in enumerate(scored) if score >= top - margin]
            win_score, win_cfg = scored[min(near)[2]]
            if win_cfg != incumbent and win_score > best + margin:
                incumbent, best, moved = win_cfg, win_score, True
        if not moved:
            break
    return incumbent, trace


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
        opt.report.write_text(render_report(results, opt))


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


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- summaries --------------------------------------------------------------------------------------------------------
def summarize(raw: dict[str, Any], families: list[Family]) -> dict[str, Any]:
    """Intervals, comparisons and the sweep summary from the raw measurements of a run."""
    opt = raw["options"]
    geometry, refs, test_rows = raw["geometry"], raw["refs"], raw["test_rows"]
    sweep_log, trace, chosen, tuned = raw["sweep_log"], raw["trace"], raw["chosen"], raw["tuned"]
    code_defaults = raw["code_defaults"]
    fam0 = families[0]
    settings = list(fam0.settings())
    domains = list(fam0.domain_tasks())
    seeds = [f.seed for f in families]

    def interval_table(accs: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
        return {s: {d: t_interval([accs[seed][s][d] for seed in seeds]) for d in domains} for s in settings}

    rows: dict[str, Any] = {}
    # references: the base and each setting's parents, under setting-neutral names (parent A / parent B)
    for name in ["base", *sorted(fam0.specialists)]:
        rows[name] = {"kind": "reference",
                      "test": {d: t_interval([refs["test"][seed][name][d] for seed in seeds]) for d in domains},
                      "gain": {d: t_interval([refs["test"][seed][name][d] - refs["test"][seed]["base"][d]
                                              for seed in seeds]) for d in domains}}
    retained_test: dict[str, Any] = {}
    for name, row in test_rows.items():
        accs = row["accuracy"]
        gains = retained_gains(families, refs["test"], accs)
        _, per_seed = selection_score(families, refs["test"], accs)
        rows[name] = {"kind": "merge", "method": row["method"], "params": row["params"], "resolved": row["resolved"],
                      "test": interval_table(accs),
                      # accuracy minus the base's, paired per seed (the seeds' bases differ a lot in skill)
                      "gain": {st: {d: t_interval([accs[seed][st][d] - refs["test"][seed]["base"][d]
                                                   for seed in seeds]) for d in domains} for st in settings},
                      "retained": {f"{s}/{d}": t_interval(v) for (s, d), v in gains.items()},
                      "retained_mean": t_interval(per_seed)}
        retained_test[name] = {"per_pair": gains, "per_seed": per_seed}

    comparisons = []
    headline = "sar (val-chosen)" if "sar (val-chosen)" in test_rows else "sar"
    blocks = [("defaults", "sar", [n for n in test_rows if n in ALL_METHODS and n != "sar"])]
    if tuned:
        blocks.append(("tuned", headline, [n for n in test_rows if n.endswith("(val-tuned)")]))
    for block, sar_name, others in blocks:
        if sar_name not in test_rows:
            continue
        for other in others:
            a, b = retained_test[sar_name], retained_test[other]
            entry: dict[str, Any] = {
                "block": block, "a": sar_name, "b": other,
                "retained_mean": t_interval([x - y for x, y in zip(a["per_seed"], b["per_seed"], strict=True)])}
            for pair in a["per_pair"]:
                diff = [x - y for x, y in zip(a["per_pair"][pair], b["per_pair"][pair], strict=True)]
                entry[f"{pair[0]}/{pair[1]}"] = t_interval(diff)
            for setting in settings:
                keys = [p for p in a["per_pair"] if p[0] == setting]
                entry[f"retained {setting}"] = t_interval(
                    [sum(a["per_pair"][k][i] - b["per_pair"][k][i] for k in keys) / len(keys)
                     for i in range(len(seeds))])
                for d in domains:
                    diff = [test_rows[sar_name]["accuracy"][seed][setting][d]
                            - test_rows[other]["accuracy"][seed][setting][d] for seed in seeds]
                    entry[f"acc {setting}/{d}"] = t_interval(diff)
            comparisons.append(entry)

    geo = summarize_geometry(families, geometry)
    sweep = {
        "start": SAR_START,
        "chosen": chosen,
        "code_defaults": code_defaults,
        "chosen_differs_from_code_defaults": {k: v for k, v in chosen.items()
                                              if _differs(code_defaults.get(k), v)},
        "rule": selection_rule_text(scored_pairs(families[0])),
        "margin": MOVE_MARGIN,
        "configs": sorted(sweep_log.values(), key=lambda x: -x["score"]),
        "trace": trace,
        "groups": [g.name for g in (SAR_GROUPS_FULL if opt["sweep"] == "full" else SAR_GROUPS_QUICK)]
        if opt["sweep"] != "none" else [],
    }
    return {
        **raw["run"],
        "settings": {"seeds": seeds, **opt,
                     "settings": {s: [p.label for p in ps] for s, ps in fam0.settings().items()},
                     "domains": fam0.domain_tasks(), "scored_pairs": [f"{s}/{d}" for s, d in scored_pairs(fam0)]},
        "geometry": {"per_seed": geometry, "summary": geo},
        "references": {"val": refs["val"], "test": refs["test"]},
        "rows": rows,
        "comparisons": comparisons,
        "sweep": sweep,
        "baseline_tuning": tuned,
    }


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is None or b is None or not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a != b


def summarize_geometry(families: list[Family], geometry: dict[int, Any]) -> dict[str, Any]:
    """Across seeds: sparsity of every specialist, and per kind of pair (same domain / cross domain) the overlap
    ratio vs chance, cosine and sign conflict."""
    seeds = [f.seed for f in families]
    fam0 = families[0]
    labels = sorted(fam0.specialists)
    sparsity = {x: t_interval([geometry[s]["models"][x]["sparsity"] for s in seeds]) for x in labels}
    pairs: dict[str, dict[str, Any]] = {}
    for p in geometry[seeds[0]]["pairs"]:
        kind = "same domain" if fam0.specialists[p["a"]].domain == fam0.specialists[p["b"]].domain else "cross domain"
        name = f"{p['a']} vs {p['b']} ({kind})"
        vals = [next(q for q in geometry[s]["pairs"] if q["a"] == p["a"] and q["b"] == p["b"]) for s in seeds]
        # a metric is undefined (None) when an update is empty, e.g. a specialist that never moved
        pairs[name] = {k: t_interval(defined) if (defined := [v[k] for v in vals if v[k] is not None]) else None
                       for k in ("jaccard", "jaccard_chance", "overlap_ratio", "cosine", "sign_conflict",
                                 "unshared_energy_a", "unshared_energy_b")}
        pairs[name]["kind"] = kind
    return {"sparsity": sparsity, "pairs": pairs}


def selection_rule_text(pairs: list[tuple[str, str]]) -> str:
    scored = ", ".join(f"{a}/{b}" for a, b in pairs)
    return (f"validation score = mean over the scored (setting, domain) pairs — {scored} — of the retained RL gain "
            "(acc_merged − acc_base) / mean_seeds(acc_ref − acc_base), acc_ref = the "
            "domain's specialist in fusion and the better parent in enhancement, averaged over family seeds; greedy "
            "coordinate ascent over the knob groups from SPEC §4.6's reconstruction (at most two passes); within a "
            f"group, options within {MOVE_MARGIN} of the best count as tied and the one changing fewest knobs wins; "
            f"the incumbent moves only for a gain above {MOVE_MARGIN}")


# -- plots ------------------------------------------------------------------------------------------------------------
def make_plots(results: dict[str, Any], plots_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = results["rows"]
    domains = list(results["settings"]["domains"])
    settings = list(results["settings"]["settings"])
    merge_names = [n for n, r in rows.items() if r["kind"] == "merge"]
    ref_names = [n for n, r in rows.items() if r["kind"] == "reference"]
    fig, axes = plt.subplots(len(settings), 1, figsize=(11, 3.0 * len(settings)), squeeze=False)
    width = 0.8 / len(domains)
    for ax, setting in zip(axes[:, 0], settings, strict=True):
        parents = results["settings"]["settings"][setting]
        names = [*parents, *merge_names]
        xs = range(len(names))
        for j, d in enumerate(domains):
            cells = [rows[n]["gain"][d] if n in ref_names else rows[n]["gain"][setting][d] for n in names]
            means = [100 * c["mean"] for c in cells]
            errs = [100 * (c["half"] or 0.0) for c in cells]
            bars = ax.bar([x + (j - (len(domains) - 1) / 2) * width for x in xs], means, width, yerr=errs,
                          capsize=2, label=d, color=f"C{j}", error_kw={"lw": 0.8})
            for patch, n in zip(bars.patches, names, strict=True):
                if n in ref_names:  # the parents hatched and lighter
                    patch.set_alpha(0.5)
                    patch.set_hatch("//")
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("test acc − base (pts)", fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{setting}: parents {' + '.join(parents)} (hatched), then the merges", fontsize=9)
        ax.axvline(len(parents) - 0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8, loc="upper right", ncols=len(domains))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = plots_dir / "methods_test.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    written.append(path.name)

    trace = results["sweep"]["trace"]
    by_key = {json.dumps(canonical(c["config"])): c for c in results["sweep"]["configs"]}
    start = by_key.get(json.dumps(canonical(results["sweep"]["start"])))
    if trace and start is not None:
        groups = list(dict.fromkeys(t["group"] for t in trace))
        counts = [max(sum(1 for t in trace if t["group"] == g and t["pass"] == p) for p in (1, 2)) for g in groups]
        fig, axes = plt.subplots(1, len(groups), figsize=(min(16, 2 + 0.45 * sum(counts) + 0.6 * len(groups)), 3.4),
                                 squeeze=False, sharey=True, gridspec_kw={"width_ratios": [c + 1 for c in counts]})
        for ax, group in zip(axes[0], groups, strict=True):
            for p in sorted({t["pass"] for t in trace if t["group"] == group}):
                pts = [t for t in trace if t["group"] == group and t["pass"] == p]
                deltas = [t_interval([a - b for a, b in zip(by_key[json.dumps(canonical(t["config"]))]["per_seed"],
                                                            start["per_seed"], strict=True)]) for t in pts]
                xs = [i + 0.2 * (p - 1) for i in range(len(pts))]
                ax.errorbar(xs, [c["mean"] for c in deltas], yerr=[c["half"] or 0.0 for c in deltas], fmt="o",
                            ms=3, capsize=2, lw=0.8, label=f"pass {p}", color=f"C{p - 1}")
                ax.set_xticks(range(len(pts)), [_group_value(group, t["config"]) for t in pts], rotation=70,
                              ha="right", fontsize=7)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_title(group, fontsize=8)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("Δ val score vs SPEC start\n(paired over seeds)", fontsize=8)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = plots_dir / "sar_sweep.png"
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path.name)
    return written


def _group_value(group: str, cfg: dict[str, Any]) -> str:
    if group == "density × rescale":
        return f"{cfg['density']:g}/{cfg['rescale']}".replace("ram_plus", "ram+")
    v = cfg[group]
    return f"{v:g}" if isinstance(v, float) else str(v)


# -- the report -------------------------------------------------------------------------------------------------------
def _pm(c: dict[str, Any] | None, pct: bool = True, digits: int = 1) -> str:
    if c is None:
        return "–"
    scale = 100 if pct else 1
    if c["half"] is None:
        return f"{scale * c['mean']:.{digits}f}"
    return f"{scale * c['mean']:.{digits}f} ± {scale * c['half']:.{digits}f}"


def _sig(c: dict[str, Any]) -> str:
    if c["half"] is None:
        return "one seed: no interval"
    if c["lo"] > 0:
        return "better (interval above 0)"
    if c["hi"] < 0:
        return "worse (interval below 0)"
    return "no significant difference"


def render_report(results: dict[str, Any], opt: Options) -> str:
    s = results["settings"]
    rows = results["rows"]
    domains = list(s["domains"])
    settings = list(s["settings"])
    seeds = s["seeds"]
    plots = os.path.relpath(opt.plots_dir, opt.report.parent) if opt.plots_dir and opt.report else "."
    geo = results["geometry"]["summary"]
    sweep = results["sweep"]
    out: list[str] = []
    w = out.append
    w("# Experiments: the sparsity curse and SAR-Merging on RL-trained checkpoints\n")
    w("Regenerate everything (families, Fisher, merges, evaluation, this file and its plots) with one command:\n")
    w("```\n.venv/bin/python bench/experiment.py --out bench/results/experiment\n```\n")
    w(f"Run on {results['machine']}, torch {results['torch']}, {results['threads']} threads, git "
      f"`{results['git_revision']}`; wall time {results['timings_s']['total'] / 60:.1f} min "
      f"({results['merges']} merges through the engine{reuse_note(results)}). Raw numbers: "
      "`bench/results/experiment/results.json` (a copy: `docs/experiments/results.json`).\n")

    w("## Summary\n")
    for line in summary_lines(results):
        w(f"- {line}")
    w("")
    w("## Setup\n")
    w(f"- **Family** (`sarmerge zoo tiny`, one per seed {', '.join(map(str, seeds))}): "
      + family_sentence(results["family_meta"], results["family_build_seconds"]))
    codes = sorted(set(results.get("zoo_code_sha256", {}).values()))
    w(f"  - zoo code (`sarmerge.zoo.family.code_fingerprint`) of every family: `{codes[0][:16]}`" if len(codes) == 1
      else "  - **warning**: the families were built by different zoo code (" + ", ".join(c[:16] for c in codes)
      + "); re-run with `--rebuild`")
    w("- **Tasks** (`sarmerge.zoo.tasks`, disjoint train/val/test splits by prompt hash): "
      + "; ".join(f"`{t}` ({d})" for d, t in s["domains"].items())
      + ". Scoring: exact match of the greedy completion.")
    w("- **Settings**: " + "; ".join(f"**{k}** = merge of {' + '.join(v)}" for k, v in s["settings"].items())
      + ". Every merged model is scored on every domain.")
    w(f"- **Evaluation**: {s['test_n']} test problems per domain (fresh per family seed) for the tables; "
      f"{s['val_n']} validation problems per domain for every choice of knobs. Greedy decoding. "
      + crosscheck_sentence(results["evaluator_crosscheck"]))
    w(f"- **Fisher**: `sarmerge fisher` (sampled, {s['fisher_examples']} examples) of each specialist on its own "
      "domain's calibration prompts (`calib_<domain>.jsonl` of the family): support-of-the-base layout for SAR, dense "
      "for Fisher merging.")
    w(f"- **Intervals**: mean ± 95 % Student-t half-width over the {len(seeds)} family seeds (the merge seed is the "
      "family seed). Differences between methods are paired by seed. With few seeds the intervals are wide by "
      "construction; a difference is called significant only when its interval excludes 0.")
    w("- **Retained RL gain** (the summary metric): (acc_merged − acc_base) / (acc_ref − acc_base), acc_ref the "
      "domain's specialist in fusion and the better parent in enhancement (denominator pooled over seeds); 1 = the "
      "merge keeps the specialist's whole RL improvement, 0 = none of it, > 1 in enhancement = better than both "
      "parents. It is averaged over " + ", ".join(s["scored_pairs"]) + ".\n")

    w("## 1. Geometry of the family: does the sparsity curse show?\n")
    w("| specialist | sparsity (share of weights unchanged in bf16) |\n|---|---|")
    for label, c in geo["sparsity"].items():
        w(f"| {label} | {_pm(c)} % |")
    w("")
    w("| pair | Jaccard of supports | chance Jaccard | overlap / chance | cosine of task vectors | sign conflict on "
      "overlap |\n|---|---|---|---|---|---|")
    for name, p in geo["pairs"].items():
        w(f"| {name} | {_pm(p['jaccard'], False, 3)} | {_pm(p['jaccard_chance'], False, 3)} | "
          f"{_pm(p['overlap_ratio'], False, 2)} | {_pm(p['cosine'], False, 3)} | {_pm(p['sign_conflict'])} % |")
    w("")
    w(geometry_verdict(geo, rows) + "\n")

    w("## 2. Every merge method on the test split\n")
    w("Accuracy in % (mean ± 95 % half-width over seeds). Methods run with their code defaults unless marked "
      "*(val-chosen)* / *(val-tuned)*, whose knobs were picked on the validation split (section 3).\n")
    for setting in settings:
        parents = s["settings"][setting]
        w(f"### {setting}: {' + '.join(parents)}\n")
        head = "| model | " + " | ".join(f"{d} acc" for d in domains) + " | retained RL gain |"
        w(head + "\n|" + "---|" * (len(domains) + 2))
        for name in ["base", *parents]:
            w(f"| *{name}* | " + " | ".join(_pm(rows[name]["test"][d]) for d in domains) + " | *reference* |")
        merges = [n for n, r in rows.items() if r["kind"] == "merge"]
        for name in sorted(merges, key=lambda n: -_setting_retained(rows[n], setting)):
            r = rows[name]
            ret = [v for k, v in r["retained"].items() if k.startswith(setting + "/")]
            ret_txt = " / ".join(_pm(v, False, 2) for v in ret)
            params = f" ({describe(r['params'])})" if r["params"] else ""
            w(f"| {name}{params} | " + " | ".join(_pm(r["test"][setting][d]) for d in domains) + f" | {ret_txt} |")
        w("")
    if results.get("plots"):
        w("Gain over the base in test accuracy points per method and domain (paired per seed, 95 % intervals):\n")
        w(f"![test accuracy gain over the base per method and domain]({plots}/methods_test.png)\n")
    w("**Retained RL gain by regime** (test; fusion = " + ", ".join(p for p in s["scored_pairs"]
                                                              if p.startswith("fusion/"))
      + "; enhancement = " + ", ".join(p for p in s["scored_pairs"] if p.startswith("enhance_"))
      + "; overall = the mean of all of them, the validation selection score):\n")
    w("| method | overall | fusion | enhancement |\n|---|---|---|---|")
    merges = [n for n, r in rows.items() if r["kind"] == "merge"]
    for name in sorted(merges, key=lambda n: -rows[n]["retained_mean"]["mean"]):
        w(f"| {name} | {_pm(rows[name]['retained_mean'], False, 2)} | "
          f"{_pm(regime_retained(rows[name], 'fusion'), False, 2)} | "
          f"{_pm(regime_retained(rows[name], 'enhance_'), False, 2)} |")
    w("")
    w(regime_sentence(rows) + "\n")

    w("## 3. SAR knob sweep (validation split only)\n")
    if sweep["trace"]:
        w(f"Selection rule: {sweep['rule']}. {len(sweep['configs'])} distinct configurations, each merged and scored "
          f"on every family seed and setting ({s['val_n']} validation problems per domain).\n")
        w(f"- start (SPEC §4.6 reconstruction): `{describe(sweep['start'])}`")
        w(f"- chosen: `{describe(sweep['chosen'])}`")
        w(f"- code defaults when this ran (`SarParams`): `{describe(sweep['code_defaults'])}`")
        diff = sweep["chosen_differs_from_code_defaults"]
        w("- " + ("the chosen knobs **differ** from the code defaults in " + ", ".join(
            f"{k} ({sweep['code_defaults'].get(k)} → {v})" for k, v in diff.items())
                  + ": update `SarParams` and re-run" if diff else "the code defaults **are** the sweep's choice")
          + "\n")
        w("| rank | configuration | val score (retained RL gain) |\n|---|---|---|")
        for i, c in enumerate(sweep["configs"][:12]):
            w(f"| {i + 1} | {describe(c['config'])} | {_pm(t_interval(c['per_seed']), False, 3)} |")
        start_key = json.dumps(canonical(sweep["start"]))
        start_entry = next((c for c in sweep["configs"] if json.dumps(canonical(c["config"])) == start_key), None)
        if start_entry is not None:
            start_ci = _pm(t_interval(start_entry["per_seed"]), False, 3)
            w(f"| – | start: {describe(start_entry['config'])} | {start_ci} |")
        w("")
        if results.get("plots") and "sar_sweep.png" in results["plots"]:
            w("Validation score of each configuration visited, minus the start's (paired per seed, 95 % intervals):\n")
            w(f"![SAR sweep: validation score per knob value, coordinate ascent passes]({plots}/sar_sweep.png)\n")
        w("Per knob group (first pass, the other knobs at the incumbent of that moment):\n")
        for group in sweep["groups"]:
            pts = [t for t in sweep["trace"] if t["group"] == group and t["pass"] == 1]
            if pts:
                w(f"- {group}: " + ", ".join(f"{_group_value(group, t['config'])} → {t['score']:.3f}" for t in pts))
        w("")
        fisher = fisher_effect(sweep)
        if fisher:
            w(fisher + "\n")
    else:
        w("No sweep in this run.\n")
    if results["baseline_tuning"]:
        w("Baselines tuned on validation with the same rule (grid → chosen):\n")
        for m, t in results["baseline_tuning"].items():
            w(f"- {m}: {len(t['tried'])} configs → `{describe(t['chosen'])}` "
              f"(val score {max(x['score'] for x in t['tried']):.3f})")
        w("")

    w("## 4. What held and what did not\n")
    for line in verdicts(results):
        w(f"- {line}")
    w("")
    w("Paired differences on the test split (SAR − other; retained RL gain, mean ± 95 % half-width over seeds; "
      "positive = SAR better):\n")
    for block, title in (("defaults", "every method at its code defaults"),
                         ("tuned", "baselines tuned on validation, SAR as chosen by its sweep")):
        comps = [c for c in results["comparisons"] if c["block"] == block]
        if not comps:
            continue
        cols = [f"retained {x}" for x in settings]
        w(f"*{title}*\n")
        w("| comparison | overall | " + " | ".join(cols) + " | verdict (overall) |\n|" + "---|" * (len(cols) + 3))
        for c in comps:
            w(f"| {c['a']} − {c['b']} | {_pm(c['retained_mean'], False, 2)} | "
              + " | ".join(_pm(c[k], False, 2) for k in cols) + f" | {_sig(c['retained_mean'])} |")
        w("")
    w("## Timings\n")
    w(", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
      + f"; merges {results['merge_seconds']:.0f} s and their evaluation {results['eval_seconds']:.0f} s in total.\n")
    return "\n".join(out) + "\n"


def fisher_differences(sweep: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Does the Fisher information help SAR? Paired validation differences of each Fisher-using choice against the
    Fisher-free one (sensitivity τ², hard arbitration), the other knobs at the chosen configuration (else the start)."""
    by_key = {json.dumps(canonical(c["config"])): c for c in sweep["configs"]}
    free = {"sensitivity": "delta2", "arbitration": "hard"}
    out = []
    for knob, value in (("sensitivity", "fisher_delta2"), ("sensitivity", "fisher"), ("arbitration", "fisher_avg"),
                        ("arbitration", "hybrid")):
        for around in (sweep["chosen"], sweep["start"]):
            # arbitration with the sensitivity of `around` (fisher_avg ignores it; hybrid uses it on conflicts)
            cfg = {**around, "arbitration": value} if knob == "arbitration" else {**around, **free, knob: value}
            a = by_key.get(json.dumps(canonical(cfg)))
            b = by_key.get(json.dumps(canonical({**around, **free})))
            if a is not None and b is not None:
                out.append((f"{knob}={value}",
                            t_interval([x - y for x, y in zip(a["per_seed"], b["per_seed"], strict=True)])))
                break
    return out


def fisher_effect(sweep: dict[str, Any]) -> str:
    diffs = fisher_differences(sweep)
    if not diffs:
        return ""
    return ("**Does the Fisher information help?** Validation score of each Fisher-using choice minus the Fisher-free "
            "SAR (sensitivity τ², hard arbitration), paired over seeds: "
            + "; ".join(f"{k}: {_pm(d, False, 3)} ({_sig(d).split(' (')[0]})" for k, d in diffs) + ".")


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The findings in a few plain sentences, every number from this run."""
    rows = results["rows"]
    if "sar" not in rows:
        return ["SAR was not part of this run."]
    geo = results["geometry"]["summary"]
    out = []
    sp = [c["mean"] for c in geo["sparsity"].values()]
    cross = [p for p in geo["pairs"].values() if p["kind"] == "cross domain" and p["cosine"] is not None]
    lin = regime_retained(rows["linear"], "fusion") if "linear" in rows else None
    if cross:
        cos = sum(p["cosine"]["mean"] for p in cross) / len(cross)
        ratio = sum(p["overlap_ratio"]["mean"] for p in cross) / len(cross)
        out.append(f"**Geometry.** The RL specialists are sparse ({100 * min(sp):.0f}–{100 * max(sp):.0f} % of weights "
                   f"unchanged in bf16) and math and code updates are nearly orthogonal (cosine {cos:+.2f}), but they "
                   f"are not spread apart: they overlap at {ratio:.1f}× the chance level."
                   + (f" Plain averaging of math and code keeps only {_pm(lin, False, 2)} of the specialists' RL gain "
                      "— the sparsity curse shows for averaging." if lin is not None and (lin["hi"] or 1) < 1 else ""))
    sar = rows["sar"]
    f, e = regime_retained(sar, "fusion"), regime_retained(sar, "enhance_")
    out.append(f"**SAR (code defaults = the sweep's choice)** keeps {_pm(sar['retained_mean'], False, 2)} of the RL "
               f"gain overall ({_pm(f, False, 2)} in fusion, {_pm(e, False, 2)} in enhancement).")
    for block, label in (("defaults", "against every baseline at its code defaults"),
                         ("tuned", "against baselines tuned on validation")):
        comps = [c for c in results["comparisons"] if c["block"] == block]
        if not comps:
            continue
        groups: dict[int, list[str]] = {1: [], -1: [], 0: []}
        for c in comps:
            groups[_sign_word(c["retained_mean"])].append(f"{c['b']} ({c['retained_mean']['mean']:+.2f} ± "
                                                           f"{c['retained_mean']['half'] or 0:.2f})")
        out.append(f"Overall retained RL gain, SAR − baseline, {label}: significantly better than "
                   f"{', '.join(groups[1]) or 'none'}; significantly worse than {', '.join(groups[-1]) or 'none'}; "
                   f"no significant difference from {', '.join(groups[0]) or 'none'}.")
    ta = next((c for c in results["comparisons"] if c["block"] == "defaults" and c["b"] == "task_arithmetic"), None)
    if ta is not None:
        bits = [f"{k.removeprefix('retained ')} {_pm(v, False, 2)} ({_sig(v).split(' (')[0]})"
                for k, v in ta.items() if k.startswith("retained ") and k != "retained_mean"]
        out.append("SAR − task arithmetic (both at defaults), retained RL gain per setting: " + "; ".join(bits) + ".")
    diffs = fisher_differences(results["sweep"])
    if diffs:
        sig = [k for k, d in diffs if _sign_word(d) != 0]
        out.append("**Fisher.** " + ("No Fisher-based choice (sensitivity F·τ² or F, Fisher-weighted or hybrid "
                                     "arbitration) differs significantly from Fisher-free SAR on validation: the "
                                     "Fisher information brings no measurable benefit on this family."
                                     if not sig else "Fisher-based choices that differ significantly from Fisher-free "
                                     "SAR on validation: " + ", ".join(sig) + " (section 3)."))
    sweep = results["sweep"]
    if sweep["trace"]:
        moved = {k: v for k, v in sweep["chosen"].items() if _differs(sweep["start"].get(k), v)}
        out.append("**Sweep.** " + ("Only " if len(moved) == 1 else "")
                   + (", ".join(f"{k}: {sweep['start'][k]} → {v}" for k, v in moved.items()) or "nothing")
                   + " moved from SPEC §4.6's reconstruction on validation"
                   + ("; `SarParams` defaults were set to the chosen configuration."
                      if not sweep["chosen_differs_from_code_defaults"] else
                      "; the code defaults still differ (see section 3)."))
    return out


def regime_retained(row: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """Per-seed mean of the retained gains of the scored pairs whose setting starts with `prefix`, with interval."""
    cells = [v for k, v in row["retained"].items() if k.startswith(prefix)]
    if not cells:
        return None
    return t_interval([sum(c["values"][i] for c in cells) / len(cells) for i in range(len(cells[0]["values"]))])


def regime_sentence(rows: dict[str, Any]) -> str:
    """The two regimes side by side for summing, averaging and the overlap-aware merges (numbers only)."""
    parts = []
    for name, what in (("task_arithmetic", "summing the task vectors (task arithmetic, λ = 1)"),
                       ("linear", "averaging the weights (linear)"), ("ram", "RAM (keep unique, average overlap)"),
                       ("sar", "SAR at its code defaults")):
        if name in rows:
            f, e = regime_retained(rows[name], "fusion"), regime_retained(rows[name], "enhance_")
            if f is not None and e is not None:
                parts.append(f"{what} keeps {f['mean']:.2f} of the RL gain in fusion and {e['mean']:.2f} in "
                             "enhancement")
    return ("By regime: " + "; ".join(parts) + ".") if parts else ""


def reuse_note(results: dict[str, Any]) -> str:
    built = [v for v in results["family_build_seconds"].values() if v is not None]
    if len(built) == len(results["family_build_seconds"]):
        return ""
    metas = results["family_meta"].values()
    build = sum(m.get("timings_s", {}).get("total", 0) for m in metas)
    return (f"; {len(results['family_build_seconds']) - len(built)} of the families were reused from an earlier run "
            f"in the same --out — building all of them took {build / 60:.1f} min more")


def _setting_retained(row: dict[str, Any], setting: str) -> float:
    vals = [v["mean"] for k, v in row["retained"].items() if k.startswith(setting + "/")]
    return sum(vals) / len(vals) if vals else 0.0


def family_sentence(metas: dict[Any, dict[str, Any]], build_seconds: dict[Any, float]) -> str:
    """The family's size, training budgets, and per-seed build times / specialist gains, from its family.json."""
    meta = next(iter(metas.values()))
    cfg = meta.get("config", {})
    model = meta.get("model", {})
    sft, grpo = cfg.get("sft", {}), cfg.get("grpo", {})
    lines = [f"{model.get('architecture', '?')} with {model.get('parameters', 0) / 1e6:.2f} M parameters "
             f"({cfg.get('layers')} layers, hidden {cfg.get('hidden')}, char tokenizer), checkpoints in "
             f"{model.get('dtype', '?')}. Base: SFT {sft.get('steps')} steps × batch {sft.get('batch_size')} "
             f"(lr {sft.get('lr')}, {100 * sft.get('slip_rate', 0):.0f} % slipped demonstrations) on the task mixture. "
             f"Specialists ({cfg.get('seeds_per_task')} GRPO seeds per task): {grpo.get('steps')} steps × "
             f"{grpo.get('prompts')} prompts × group {grpo.get('group')} (lr {grpo.get('lr')}, "
             f"{grpo.get('optimizer')}, KL {grpo.get('kl_coef')}), fp32 master weights saved in bf16."]
    n_test = cfg.get("test_problems", "?")
    for seed, m in metas.items():
        built = m.get("timings_s", {}).get("total")
        gains = ", ".join(f"{x['name']} {100 * x['gain']:+.1f} pts ({100 * x['unchanged_fraction']:.0f} % unchanged)"
                          for x in m.get("members", []))
        took = f"built in {built:.0f} s on {cfg.get('threads', 1)} thread; " if built is not None else ""
        lines.append(f"  - seed {seed}: {took}own-task gain over the base on {n_test} test problems "
                     f"(family.json): {gains}")
    return "\n".join(lines)


def crosscheck_sentence(c: dict[str, Any]) -> str:
    agree = all(abs(v["sarmerge_evaluate"] - v["direct"]) < 1e-9 for v in c.values())
    txt = ", ".join(f"{d}: {100 * v['direct']:.1f} % vs {100 * v['sarmerge_evaluate']:.1f} %" for d, v in c.items())
    return ("The direct task scorer used here agrees with `sarmerge evaluate` on the zoo suites (base of the first "
            f"family, test split: {txt})." if agree else
            f"Cross-check with `sarmerge evaluate` (zoo suites, base of the first family): direct vs evaluator {txt} "
            "— they differ slightly (generation length/batching).")


def geometry_verdict(geo: dict[str, Any], rows: dict[str, Any]) -> str:
    """Plain statements: how sparse, how overlapping and how aligned the updates are, and whether averaging then
    loses the specialists' skill (the curse itself) — each precondition checked on its own."""
    sp = [c["mean"] for c in geo["sparsity"].values()]
    lo, hi = min(sp), max(sp)
    sparse = lo >= 0.5
    sparse_word = ("in the range reported for real RLVR checkpoints (70–95 %)" if lo >= 0.7 else
                   "sparse, though below the 70–95 % of real RLVR checkpoints" if sparse else "not sparse")
    lines = [f"- **Sparse?** {'Yes' if sparse else 'No'}: the specialists leave {100 * lo:.0f}–{100 * hi:.0f} % of "
             f"the weights bit-identical to the base in bf16 ({sparse_word})."]

    def mean_of(ps: list[dict[str, Any]], key: str) -> float | None:
        vals = [p[key]["mean"] for p in ps if p.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    cross = [p for p in geo["pairs"].values() if p["kind"] == "cross domain"]
    same = [p for p in geo["pairs"].values() if p["kind"] == "same domain"]
    facts = {}
    for kind, ps in (("cross", cross), ("same", same)):
        facts[kind] = tuple(mean_of(ps, k) for k in ("jaccard", "jaccard_chance", "overlap_ratio", "cosine"))
    jac, chance, ratio, cos = facts["cross"]
    if None in facts["cross"]:
        lines.append("- Cross-domain overlap and cosine are undefined (an update is empty).")
        return "\n".join(lines)
    apart = ratio <= 1.1
    orth = abs(cos) < 0.1
    where = "below" if ratio < 0.9 else "above" if ratio > 1.1 else "at"
    lines.append(f"- **Spread apart?** {'Yes' if apart else 'No'}: math and code updates share weights with Jaccard "
                 f"{jac:.3f} against {chance:.3f} for independently placed supports of the same densities — "
                 f"{ratio:.2f}× chance ({where} chance)"
                 + ("." if apart else ": they crowd onto the same weights rather than avoiding each other."))
    lines.append(f"- **Nearly orthogonal?** {'Yes' if orth else 'No'}: cosine of the math and code task vectors "
                 f"{cos:+.3f}; their signs disagree on {100 * (mean_of(cross, 'sign_conflict') or 0):.0f} % of the "
                 "weights both moved.")
    if None not in facts["same"]:
        sj, _, sr, scos = facts["same"]
        lines.append(f"- Same-domain seeds, by contrast, are aligned: Jaccard {sj:.3f} ({sr:.2f}× chance), cosine "
                     f"{scos:+.3f}.")
    lin = rows.get("linear", {}).get("retained", {})
    fusion = [v for k, v in lin.items() if k.startswith("fusion/")]
    if fusion:
        kept = sum(v["mean"] for v in fusion) / len(fusion)
        upper = max((v["hi"] if v["hi"] is not None else v["mean"]) for v in fusion)
        diluted = upper < 1.0
        lines.append(f"- **Does averaging lose the skill (the curse itself)?** {'Yes' if diluted else 'Not clearly'}: "
                     f"plain averaging (linear) of the math and code specialists keeps {kept:.2f} of their RL gain "
                     "on test (per domain: " + ", ".join(f"{k.split('/')[1]} {_pm(v, False, 2)}" for k, v in
                                                          zip([k for k in lin if k.startswith('fusion/')], fusion,
                                                              strict=True)) + ").")
    return "\n".join(lines)


def _sign_word(c: dict[str, Any]) -> int:
    if c["half"] is None:
        return 0
    return 1 if c["lo"] > 0 else -1 if c["hi"] < 0 else 0


def verdicts(results: dict[str, Any]) -> list[str]:
    """Plain statements from the numbers: how SAR compares with each baseline, and what the sweep changed."""
    out = []
    rows = results["rows"]
    settings = list(results["settings"]["settings"])
    domains = list(results["settings"]["domains"])
    merges = [n for n, r in rows.items() if r["kind"] == "merge"]
    if "sar" not in merges:
        return ["SAR was not part of this run."]
    headline = "sar (val-chosen)" if "sar (val-chosen)" in merges else "sar"
    ordered = sorted(merges, key=lambda n: -rows[n]["retained_mean"]["mean"])
    out.append(f"Best merge by overall retained RL gain on test: **{ordered[0]}** "
               f"({_pm(rows[ordered[0]]['retained_mean'], False, 2)}); {headline} ranks "
               f"{ordered.index(headline) + 1} of {len(ordered)} ({_pm(rows[headline]['retained_mean'], False, 2)}).")
    for block, label in (("defaults", "every method at its code defaults"),
                         ("tuned", "baselines with knobs tuned on validation")):
        comps = [c for c in results["comparisons"] if c["block"] == block]
        if not comps:
            continue
        for setting in settings:
            groups: dict[int, list[str]] = {1: [], -1: [], 0: []}
            for c in comps:
                groups[_sign_word(c[f"retained {setting}"])].append(c["b"])
            out.append(f"{setting} ({label}): {comps[0]['a']} is significantly better than "
                       f"{', '.join(groups[1]) or 'none'}; significantly worse than {', '.join(groups[-1]) or 'none'}; "
                       f"not significantly different from {', '.join(groups[0]) or 'none'} (paired over seeds, "
                       "retained RL gain).")
        ta = next((c for c in comps if c["b"].startswith("task_arithmetic")), None)
        if ta is not None:
            bits = [f"{setting}/{d} {100 * ta[f'acc {setting}/{d}']['mean']:+.1f}"
                    + (f" ± {100 * ta[f'acc {setting}/{d}']['half']:.1f}" if ta[f"acc {setting}/{d}"]["half"] else "")
                    for setting in settings for d in domains]
            out.append(f"{ta['a']} − {ta['b']}, test accuracy points: " + ", ".join(bits) + ".")
    sweep = results["sweep"]
    if sweep["trace"]:
        moved = {k: v for k, v in sweep["chosen"].items() if _differs(sweep["start"].get(k), v)}
        out.append("Sweep (validation): " + ("no knob moved away from the SPEC §4.6 reconstruction by more than the "
                                             "margin." if not moved else "moved " + ", ".join(
                                                 f"{k} {sweep['start'][k]} → {v}" for k, v in moved.items()) + ".")
                   + (" The code defaults equal the chosen configuration."
                      if not sweep["chosen_differs_from_code_defaults"] else
                      " The code defaults differ from the chosen configuration (reported separately as "
                      "*sar (val-chosen)*)."))
    return out


# -- CLI --------------------------------------------------------------------------------------------------------------
def parse_args(argv: Iterable[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "experiment",
                   help="working directory: families (cached), Fisher stores, results.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="family seeds (default 0–4)")
    p.add_argument("--test-n", type=int, default=500, help="test problems per domain (default 500)")
    p.add_argument("--val-n", type=int, default=200, help="validation problems per domain (default 200)")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, help="merge methods (default: all compared)")
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
    try:
        opt = parse_args(argv)
        if opt.report_only:
            results = resummarize(opt.out)
            (opt.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
            write_outputs(results, opt)
        else:
            results = run_experiment(opt)
    except SarmergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in verdicts(results):
        print(line)
    print(f"results: {opt.out / 'results.json'}" + (f"; report: {opt.report}" if opt.report else ""))
    return 0


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """results.json without the bulky per-config validation accuracies (the committed copy)."""
    out = dict(results)
    out["sweep"] = {**results["sweep"], "configs": [{k: c[k] for k in ("config", "score", "per_seed")}
                                                     for c in results["sweep"]["configs"]]}
    out["geometry"] = {"summary": results["geometry"]["summary"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
