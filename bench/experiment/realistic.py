"""The experiment on the RLVR-realistic family: SmolLM2-135M-Instruct specialists trained with TRL's GRPOTrainer
(`sarmerge zoo smollm2-grpo`: two tasks, by default math_nl and code_minmax_nl, two seeds each, bf16 checkpoints).
One command:

    .venv/bin/python -m bench.experiment.realistic --family DIR [--workers 2] [--test-n 100] [--val-n 40] \
        [--compare docs/experiments/smollm2_grpo20_results.json]

Settings: fusion of the seed-0 pair and of the seed-1 pair (math + code), enhancement of each domain's two seeds.
Compared on the first --test-n of the family's own 200 held-out test problems per task (the problems its paired
gain tests used, so the base and parents are not re-scored): every standard method at its code defaults; SAR's
Fisher ablation (sampled = the default, empirical, a Fisher from random-token prompts with no calibration data,
Fisher-free `delta2`); SAR with SPEC §4.6's `rescale: norm` (the default before the tiny family's sweep chose
`ram_plus`); and every scaled method's λ (and SAR's rescale) tuned on validation problems when that beats the default
there. Intervals are paired over family seeds and problems: 95 % normal intervals of the per-problem difference
(pooled over both pairs/domains of a setting), with the exact McNemar test. Writes
docs/experiments/smollm2_results.json, docs/experiments/smollm2_methods.png and the block between
`<!-- realistic:begin -->` and `<!-- realistic:end -->` in EXPERIMENTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench._report import machine, replace_block
from bench.experiment.design import ROOT
from bench.experiment.families import Family, read_family
from sarmerge.errors import SarmergeError, run_cli

log = logging.getLogger("experiment.realistic")
BEGIN, END = "<!-- realistic:begin -->", "<!-- realistic:end -->"
DEFAULT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "ram", "ram_plus", "sar"]
# validation grids: each method's main knob around its default (the default is always a candidate)
TUNE_GRIDS: dict[str, list[dict[str, Any]]] = {
    # sized for a 2-core CPU (each candidate is 4 merges scored on validation): every scaled method's λ, and SAR's
    # rescale against SPEC §4.6's start (its defaults are re-decided here, on validation, never on test)
    "task_arithmetic": [{"lambda": 0.5}, {"lambda": 1.5}],
    "ties": [{"lambda": 1.5}],
    "dare_ties": [{"lambda": 1.5}],
    "ram": [{"lambda": 1.5}],
    "ram_plus": [{"lambda": 1.5}],
    "sar": [{"lambda": 1.5}, {"rescale": "norm"}],
}
VARIANTS: list[tuple[str, str, dict[str, Any], str | None]] = [
    # label, method, parameters, Fisher variant (None: the method reads no Fisher)
    ("sar · empirical Fisher", "sar", {}, "empirical"),
    ("sar · random-token Fisher", "sar", {}, "random"),
    ("sar · Fisher-free (delta2)", "sar", {"sensitivity": "delta2"}, None),
    ("sar · rescale norm (SPEC start)", "sar", {"rescale": "norm"}, "sampled"),
]
Z975 = 1.959963984540054


# -- statistics -----------------------------------------------------------------------------------------------------
def wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p, z2 = k / n, Z975 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def paired(a: list[int], b: list[int]) -> dict[str, Any]:
    """a − b on the same problems (the zoo's paired gain test: mean, 95 % normal interval, exact McNemar p) and its
    verdict."""
    from sarmerge.zoo.smollm2 import paired_gain

    t = paired_gain(b, a)
    lo, hi = t["ci95"]
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "inconclusive"
    return {"n": t["problems"], "diff": t["gain"], "ci95": t["ci95"], "wins": t["gained"], "losses": t["lost"],
            "mcnemar_p": t["mcnemar_p"], "verdict": verdict}


# -- the family, its Fishers and the merges -------------------------------------------------------------------------
def settings_of(fam: Family) -> dict[str, list[str]]:
    by = {(s.domain, s.seed): s.label for s in fam.specialists.values()}
    domains = sorted({d for d, _ in by})
    seeds = sorted({k for _, k in by})
    out = {f"fusion_s{k}": [by[(d, k)] for d in domains] for k in seeds if all((d, k) in by for d in domains)}
    if len(seeds) >= 2:
        out |= {f"enhance_{d}": [by[(d, k)] for k in seeds[:2]] for d in domains
                if all((d, k) in by for k in seeds[:2])}
    if not any(k.startswith("fusion") for k in out) or not any(k.startswith("enhance") for k in out):
        raise SarmergeError(f"{fam.root}: needs two domains and two seeds per domain (fusion and enhancement)")
    return out


def random_token_prompts(tokenizer_dir: Path, out: Path, n: int, length: int, seed: int) -> Path:
    """FIM-Merging's data-free Fisher: prompts of uniformly random (non-special) tokens; the responses are sampled."""
    from sarmerge.hf import checkpoint_tokenizer

    tok = checkpoint_tokenizer(tokenizer_dir)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    with out.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": tok.decode([rng.choice(vocab) for _ in range(length)])}) + "\n")
    return out


def compute_fishers(fam: Family, store: Path, examples: int,
                    progress: bool) -> tuple[dict[str, dict[str, Path]], float]:
    """label → variant → support-layout Fisher store (sampled, empirical, random), cached in `store`; and the
    seconds spent computing the stores that were not cached."""
    from sarmerge.fisher import run_fisher
    from sarmerge.zoo.tasks import get_task

    store.mkdir(parents=True, exist_ok=True)
    noise = random_token_prompts(fam.base, store / "random_tokens.jsonl", examples, 32, fam.seed)
    out: dict[str, dict[str, Path]] = {}
    spent = 0.0
    for label, s in sorted(fam.specialists.items()):
        out[label] = {}
        budget = get_task(s.task).max_new_tokens or 24
        for variant, data, mode in (("sampled", fam.calibration[s.domain], "sampled"),
                                    ("empirical", fam.calibration[s.domain], "empirical"),
                                    ("random", noise, "sampled")):
            path = store / f"{label}-{variant}-{examples}"
            if not (path / "fisher_manifest.json").exists():
                t0 = time.perf_counter()
                run_fisher(s.path, data, path, mode=mode, examples=examples, support_of=fam.base,
                           max_new_tokens=budget, seed=fam.seed, batch_size=4, overwrite=True, progress=progress)
                spent += time.perf_counter() - t0
                log.info("fisher %s %s: %.0f s", label, variant, time.perf_counter() - t0)
            out[label][variant] = path
    return out, spent


def merge_raw(fam: Family, parents: list[str], method: str, params: dict[str, Any],
              fishers: dict[str, dict[str, Path]], variant: str | None) -> dict[str, Any]:
    from sarmerge.methods import get_method

    spec = get_method(method)
    wants = variant is not None and spec.needs_fisher(spec.params.model_validate(params))
    models = [{"model": str(fam.specialists[p].path), **({"fisher": str(fishers[p][variant])} if wants else {})}
              for p in parents]
    return {"method": method, "base_model": str(fam.base), "models": models, "parameters": params, "seed": fam.seed}


def _score_job(job: dict[str, Any]) -> dict[str, str]:
    """In a worker: merge one config on one setting, score it per problem on every requested task, delete it."""
    import contextlib
    import io

    import torch

    from sarmerge.config import parse_config
    from sarmerge.hf import checkpoint_tokenizer, load_causal_lm
    from sarmerge.merge import run_merge
    from sarmerge.zoo.smollm2 import problem_scores
    from sarmerge.zoo.tasks import get_task

    torch.set_num_threads(job["threads"])
    logging.getLogger("sarmerge").setLevel(logging.WARNING)  # one line per merge would drown the progress bar
    out = Path(tempfile.mkdtemp(prefix="sarmerge-real-", dir=job["scratch"])) / "merged"
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            run_merge(parse_config(job["config"], source=job["label"]), out, progress=False)
        model = load_causal_lm(out, dtype=torch.float32, device="cpu")
        tok = checkpoint_tokenizer(out)
        scores = {}
        for task, n, split, seed in job["tasks"]:
            problems = get_task(task).generate(n, seed=seed, split=split)
            scores[task] = "".join(str(int(v)) for v in problem_scores(model, tok, get_task(task), problems))
        return scores
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


class Runner:
    """Runs (config, setting, split) jobs in worker processes; every result is kept in raw.json (reruns resume)."""

    def __init__(self, fam: Family, fishers: dict[str, dict[str, Path]], out: Path, workers: int, threads: int):
        self.fam, self.fishers, self.workers, self.threads = fam, fishers, workers, threads
        self.raw_path = out / "raw.json"
        self.raw: dict[str, dict[str, str]] = json.loads(self.raw_path.read_text()) if self.raw_path.exists() else {}
        self.scratch = out / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.tasks = {s.domain: s.task for s in fam.specialists.values()}
        self.settings = settings_of(fam)

    @staticmethod
    def key(label: str, setting: str, split: str, n: int) -> str:
        return f"{label}|{setting}|{split}|{n}"

    def run(self, configs: list[tuple[str, str, dict[str, Any], str | None]], split: str, n: int,
            progress: bool = True) -> float:
        """Run the jobs not in raw.json yet; the seconds that took (0 when every result was there)."""
        jobs = []
        for label, method, params, variant in configs:
            for setting, parents in self.settings.items():
                if self.key(label, setting, split, n) in self.raw:
                    continue
                # fusion is scored on every domain, enhancement on its own domain (the skill it should keep)
                domains = sorted(self.tasks) if setting.startswith("fusion") else [setting.removeprefix("enhance_")]
                jobs.append({"label": label, "setting": setting, "split": split, "threads": self.threads,
                             "scratch": str(self.scratch),
                             "config": merge_raw(self.fam, parents, method, params, self.fishers, variant),
                             "tasks": [(self.tasks[d], n, split, self.fam.seed) for d in domains]})
        if not jobs:
            return 0.0
        from tqdm import tqdm

        t0 = time.perf_counter()
        with ProcessPoolExecutor(self.workers) as pool, tqdm(total=len(jobs), desc=f"{split} merges+scores",
                                                             disable=not progress) as bar:
            for job, scores in zip(jobs, pool.map(_score_job, jobs), strict=True):
                self.raw[self.key(job["label"], job["setting"], split, n)] = scores
                self.raw_path.write_text(json.dumps(self.raw, indent=0, sort_keys=True) + "\n")
                bar.update()
        log.info("%d %s jobs in %.0f s (%d workers)", len(jobs), split, time.perf_counter() - t0, self.workers)
        return time.perf_counter() - t0

    def scores(self, label: str, setting: str, split: str, n: int) -> dict[str, list[int]]:
        return {t: [int(c) for c in s] for t, s in self.raw[self.key(label, setting, split, n)].items()}


# -- the run --------------------------------------------------------------------------------------------------------
def reference_scores(fam: Family) -> dict[str, dict[str, list[int]]]:
    """base / each specialist → task → per-problem greedy scores on the family's test problems (scores.json)."""
    recorded = json.loads((fam.root / "scores.json").read_text())["scores"]
    return {m: {t: [int(c) for c in s] for t, s in by.items()} for m, by in recorded.items()}


def summarize(run: Runner, labels: list[str], test_n: int, refs: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    fam = run.fam
    rows: dict[str, Any] = {}
    for label in labels:
        row: dict[str, Any] = {"settings": {}}
        for setting, parents in run.settings.items():
            got = run.scores(label, setting, "test", test_n)
            cell: dict[str, Any] = {}
            for task, s in got.items():
                cell[task] = {"acc": round(sum(s) / len(s), 4), "ci95": wilson(sum(s), len(s)),
                              "vs_base": paired(s, refs["base"][task][:len(s)])}
                own = [p for p in parents if fam.specialists[p].task == task]
                if own:  # each parent on its own task, on the same problems
                    cell[task]["vs_parents"] = {p: paired(s, refs[p][task][:len(s)]) for p in own}
            row["settings"][setting] = cell
        rows[label] = row
    # pooled comparisons with SAR (its defaults) on every (setting, task, problem) unit of each regime
    def units(label: str, regime: str) -> list[int]:
        return [v for st in run.settings if st.startswith(regime)
                for t, s in sorted(run.scores(label, st, "test", test_n).items()) for v in s]

    def gain_units(label: str, regime: str) -> list[int]:  # merged minus the parent of that task: retention
        out = []
        for st, parents in run.settings.items():
            if st.startswith(regime):
                for t, s in sorted(run.scores(label, st, "test", test_n).items()):
                    ps = [refs[p][t][:len(s)] for p in parents if fam.specialists[p].task == t]
                    best = [max(col) for col in zip(*ps, strict=True)] if len(ps) > 1 else ps[0]
                    out += [a - b for a, b in zip(s, best, strict=True)]
        return out

    for label in labels:
        rows[label]["fusion_mean"] = round(sum(units(label, "fusion")) / len(units(label, "fusion")), 4)
        rows[label]["enhance_mean"] = round(sum(units(label, "enhance")) / len(units(label, "enhance")), 4)
        rows[label]["fusion_retention"] = round(sum(gain_units(label, "fusion")) / len(gain_units(label, "fusion")), 4)
        rows[label]["vs_sar"] = {r: paired(units("sar", r), units(label, r)) if label != "sar" else None
                                 for r in ("fusion", "enhance")}
    return rows


def family_key(root: Path) -> str:
    """The zoo's cache key of a family folder, or (a hand-made family) the digest of its family.json."""
    text = (root / "family.json").read_bytes()
    return json.loads(text).get("key") or hashlib.sha256(text).hexdigest()[:20]


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    fam = read_family(args.family, seed=json.loads((args.family / "family.json").read_text()).get("seed", 0))
    refs = reference_scores(fam)
    test_n = min(len(next(iter(refs["base"].values()))), args.test_n)
    # Fisher stores and raw scores are named by specialist and setting, so they live under the family's key: a
    # rebuilt family (same names, new weights) never resumes from the old one's results
    work = args.out / f"family-{family_key(args.family)}"
    work.mkdir(parents=True, exist_ok=True)
    # compute seconds summed over the runs that did the work: a resumed run adds only what it computed
    spent_path = work / "spent.json"
    spent = json.loads(spent_path.read_text()) if spent_path.exists() else {
        "fisher": 0.0, "validation": 0.0, "test": 0.0, "load_average": None}

    def add(phase: str, seconds: float) -> None:
        spent[phase] = round(spent[phase] + seconds, 1)
        if phase == "test" and seconds:
            spent["load_average"] = [round(x, 1) for x in os.getloadavg()]
        spent_path.write_text(json.dumps(spent) + "\n")

    fishers, seconds = compute_fishers(fam, work / "fisher", args.fisher_examples, args.progress)
    add("fisher", seconds)
    run = Runner(fam, fishers, work, args.workers, args.threads)
    # validation: every method's default and its grid; the best mean (fusion + enhancement units) is its tuned pick
    grid = [(f"{m} {json.dumps(p, sort_keys=True)}", m, p, "sampled") for m, ps in TUNE_GRIDS.items() for p in ps]
    defaults = [(m, m, {}, "sampled") for m in args.methods]
    add("validation", run.run([d for d in defaults if d[1] in TUNE_GRIDS] + grid, "val", args.val_n, args.progress))
    tuned: dict[str, dict[str, Any]] = {}
    for m, ps in TUNE_GRIDS.items():
        if m not in args.methods:
            continue
        cands = [(m, {}), *((f"{m} {json.dumps(p, sort_keys=True)}", p) for p in ps)]
        means = {lab: round(sum(u := _val_units(run, lab, args.val_n)) / len(u), 4) for lab, _ in cands}
        best_label, best_params = max(cands, key=lambda c: (means[c[0]], c[0] == m))  # ties keep the default
        # how far each candidate is from the default on the same validation problems (is the pick noise?)
        vs_default = {lab: paired(_val_units(run, lab, args.val_n), _val_units(run, m, args.val_n))
                      for lab, _ in cands[1:]}
        tuned[m] = {"params": best_params, "val_means": means, "val_vs_default": vs_default, "chosen": best_label}
    variants = [v for v in VARIANTS if "sar" in args.methods]
    # a tuned pick that is already a variant (SAR with rescale norm) is scored once, under the variant's label
    tuned_configs = [(f"{m} tuned {json.dumps(t['params'], sort_keys=True)}", m, t["params"], "sampled")
                     for m, t in tuned.items()
                     if t["params"] and not any((v[1], v[2]) == (m, t["params"]) for v in variants)]
    configs = [*defaults, *variants, *tuned_configs]
    add("test", run.run(configs, "test", test_n, args.progress))
    labels = [c[0] for c in configs]
    return {
        "family": {"root": str(fam.root), "key": fam.meta.get("key"), "model": fam.meta.get("model"),
                   "members": {m["name"]: {k: m.get(k) for k in ("task", "seed", "gain", "own_task_test",
                                                                  "unchanged_fraction")}
                               for m in fam.meta["members"]},
                   "base_accuracy": fam.meta["base"]["accuracy"], "trainer": fam.meta.get("trainer"),
                   "grpo": fam.meta.get("config", {}).get("grpo")},
        "settings": run.settings, "test_n": test_n, "val_n": args.val_n, "fisher_examples": args.fisher_examples,
        "configs": {c[0]: {"method": c[1], "params": c[2], "fisher": c[3]} for c in configs},
        "tuning": tuned, "rows": summarize(run, labels, test_n, refs),
        "seconds": {k: spent[k] for k in ("fisher", "validation", "test")},
        "machine": f"{machine()}; {args.workers} worker processes × {args.threads} torch thread(s)",
        "load_average": spent["load_average"],
    }


def _val_units(run: Runner, label: str, n: int) -> list[int]:
    return [v for st in run.settings for _, s in sorted(run.scores(label, st, "val", n).items()) for v in s]


# -- the report -----------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(c: list[float]) -> str:
    return f"[{100 * c[0]:+.1f}, {100 * c[1]:+.1f}]"


def render(results: dict[str, Any], tiny_summary: str) -> str:
    rows, fam = results["rows"], results["family"]
    tasks = sorted({t for r in rows.values() for cell in r["settings"].values() for t in cell})
    members = fam["members"]
    settings = ", ".join(f"{k} = {' + '.join(v)}" for k, v in results["settings"].items())
    lines = [
        "## 5. The RLVR-realistic family: SmolLM2-135M-Instruct trained with TRL's GRPOTrainer",
        "",
        f"Regenerate: `python -m bench.experiment.realistic --family DIR --compare EARLIER.json` (DIR from `sarmerge "
        f"zoo smollm2-grpo`, EARLIER.json an earlier run's results to tabulate beside; raw results in "
        f"`docs/experiments/smollm2_results.json`). Family key `{fam['key']}`; GRPO "
        f"{json.dumps(fam['grpo'])}. Base accuracy {json.dumps(fam['base_accuracy'])} on the family's own held-out "
        f"test problems; the merges below are scored on the first {results['test_n']} of them per task.",
        "",
        "| specialist | own task | base → specialist | paired gain, 95 % CI | McNemar p | weights unchanged in bf16 |",
        "|---|---|---:|---|---:|---:|",
    ]
    for name, m in sorted(members.items()):
        t = m["own_task_test"]
        lines.append(f"| {name} | {m['task']} | {_pct(t['before'])} → {_pct(t['after'])} | {100 * t['gain']:+.1f} "
                     f"{_ci(t['ci95'])} | {t['mcnemar_p']:.3g} | {100 * m['unchanged_fraction']:.1f} % |")
    lines += [
        "",
        f"Merges: every method at its code defaults, SAR's Fisher ablation, SAR with SPEC §4.6's `rescale: norm`, and "
        f"each method tuned on {results['val_n']} validation problems per task and setting where that beat its "
        f"default. Settings: {settings}. "
        f"Fusion is scored on both tasks, enhancement on its own task. Accuracies in %; "
        f"Δ = paired difference in points with its 95 % interval, pooled over both seeds' pairs and all problems.",
        "",
        "| merge | " + " | ".join(f"{s} {t.split('_')[0]}" for s in results["settings"] for t in tasks
                                if t in rows["sar"]["settings"][s]) + " | fusion mean | fusion Δ vs own parent | "
        "enhancement mean | SAR − this, fusion | SAR − this, enhancement |",
    ]
    cols = [(s, t) for s in results["settings"] for t in tasks if t in rows["sar"]["settings"][s]]
    lines.append("|---|" + "---:|" * (len(cols) + 3) + "---|---|")
    for label, r in rows.items():
        cells = [_pct(r["settings"][s][t]["acc"]) for s, t in cols]
        vs = [("—" if r["vs_sar"][k] is None else f"{100 * r['vs_sar'][k]['diff']:+.1f} {_ci(r['vs_sar'][k]['ci95'])} "
               f"{r['vs_sar'][k]['verdict'].replace('better', 'SAR better').replace('worse', 'SAR worse')}")
              for k in ("fusion", "enhance")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(r['fusion_mean'])} | "
                     f"{100 * r['fusion_retention']:+.1f} | {_pct(r['enhance_mean'])} | {vs[0]} | {vs[1]} |")
    lines += ["", "Tuning on validation (mean accuracy over every setting's scored problems, and each candidate − the "
              "default, paired, with its 95 % interval; ties keep the default):",
              ""]
    for m, t in results["tuning"].items():
        vs = t.get("val_vs_default", {})
        means = ", ".join(f"{k.removeprefix(m).strip() or 'default'} {_pct(v)}"
                          + (f" ({100 * vs[k]['diff']:+.1f} {_ci(vs[k]['ci95'])} vs default)" if k in vs else "")
                          for k, v in t["val_means"].items())
        lines.append(f"- {m}: {means} → {'default' if not t['params'] else json.dumps(t['params'])}")
    secs = results["seconds"]
    lines += ["", "![methods on the SmolLM2 family](docs/experiments/smollm2_methods.png)", "", tiny_summary,
              "", f"Time (summed over the runs that computed the results): Fisher {secs['fisher']:.0f} s, "
              f"validation {secs['validation']:.0f} s, test {secs['test']:.0f} s on {results['machine']} (load "
              f"average at the end of the test phase {results['load_average']})."]
    return "\n".join(lines)


def read_earlier(path: Path) -> dict[str, Any]:
    """An earlier run's smollm2_results.json for --compare, checked for what compare_table reads."""
    try:
        earlier = json.loads(path.read_text())
        steps, key = earlier["family"]["grpo"]["steps"], earlier["family"]["key"]
        rows = earlier["rows"]
        for label, row in rows.items():
            for k in ("fusion_mean", "enhance_mean", "vs_sar"):
                if k not in row:
                    raise SarmergeError(f"{path}: rows[{label!r}] has no {k!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SarmergeError(f"{path}: not a smollm2_results.json written by this experiment ({e!r})") from None
    if not isinstance(steps, int) or not isinstance(key, str):
        raise SarmergeError(f"{path}: family.grpo.steps and family.key must be an integer and a string")
    return earlier


def compare_table(results: dict[str, Any], earlier: dict[str, Any]) -> str:
    """Every merge of this run beside the same label in an earlier run's results (another family build)."""
    def name(r: dict[str, Any]) -> str:
        return f"{r['family']['grpo']['steps']}-step family `{r['family']['key']}`"

    def vs(r: dict[str, Any] | None, label: str, regime: str) -> str:
        v = r["rows"][label]["vs_sar"][regime] if r and label in r["rows"] else None
        if v is None:
            return "—" if r and label in r["rows"] else "not run"
        return f"{100 * v['diff']:+.1f} {_ci(v['ci95'])}"

    def mean(r: dict[str, Any], label: str, key: str) -> str:
        return _pct(r["rows"][label][key]) if label in r["rows"] else "not run"

    a, b = (f"{r['family']['grpo']['steps']} steps" for r in (results, earlier))
    lines = [f"This family ({name(results)}) beside the {name(earlier)}: accuracy means in %, SAR − this in points "
             "with its paired 95 % interval (\"not run\": that label was not part of that run).", "",
             f"| merge | fusion mean, {a} / {b} | enhancement mean, {a} / {b} | SAR − this, fusion, {a} | {b} | "
             f"SAR − this, enhancement, {a} | {b} |", "|---|---:|---:|---|---|---|---|"]
    for label in [*results["rows"], *(k for k in earlier["rows"] if k not in results["rows"])]:
        cur = results if label in results["rows"] else None
        lines.append(f"| {label} | {mean(results, label, 'fusion_mean')} / {mean(earlier, label, 'fusion_mean')} | "
                     f"{mean(results, label, 'enhance_mean')} / {mean(earlier, label, 'enhance_mean')} | "
                     f"{vs(cur, label, 'fusion')} | {vs(earlier, label, 'fusion')} | {vs(cur, label, 'enhance')} | "
                     f"{vs(earlier, label, 'enhance')} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    for ax, regime in zip(axes, ("fusion", "enhance"), strict=True):
        diffs = [0.0 if rows[n]["vs_sar"][regime] is None else -rows[n]["vs_sar"][regime]["diff"] for n in labels]
        lows = [0.0 if rows[n]["vs_sar"][regime] is None else -rows[n]["vs_sar"][regime]["ci95"][1] for n in labels]
        highs = [0.0 if rows[n]["vs_sar"][regime] is None else -rows[n]["vs_sar"][regime]["ci95"][0] for n in labels]
        ys = range(len(labels))
        ax.errorbar([100 * d for d in diffs], list(ys), xerr=[[100 * (d - lo) for d, lo in zip(diffs, lows,
                                                                                              strict=True)],
                                                             [100 * (hi - d) for d, hi in zip(diffs, highs,
                                                                                              strict=True)]],
                    fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{regime}: this − SAR (defaults), accuracy points, paired 95 % CI")
    fig.suptitle("SmolLM2-135M-Instruct TRL-GRPO family: each merge against SAR on the same problems")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tiny_side_by_side() -> str:
    """One paragraph on the tiny family from its committed results (docs/experiments/results.json)."""
    f = ROOT / "docs" / "experiments" / "results.json"
    if not f.exists():
        return "The tiny family's results (docs/experiments/results.json) are not present."
    return ("Side by side with the tiny family: see §1–§4 above (docs/experiments/results.json); the section "
            "\"Geometry against RLVR's reported signatures\" compares the families' update geometry.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiment.realistic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, type=Path, help="a `sarmerge zoo smollm2-grpo` folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "realistic")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--test-n", type=int, default=100, help="test problems per task (at most the family's)")
    p.add_argument("--val-n", type=int, default=40, help="validation problems per task and setting")
    p.add_argument("--fisher-examples", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="merge+score worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--experiments", type=Path, default=ROOT / "EXPERIMENTS.md")
    p.add_argument("--plots-dir", type=Path, default=ROOT / "docs" / "experiments")
    p.add_argument("--compare", type=Path, default=None,
                   help="an earlier run's smollm2_results.json (another family build) to tabulate beside this one")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        if "sar" not in args.methods:
            raise SarmergeError("--methods must include sar (every comparison is against it)")
        args.family = args.family.resolve()
        earlier = read_earlier(args.compare) if args.compare is not None else None  # before an hour of work
        results = run_experiment(args)
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        (args.plots_dir / "smollm2_results.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.plots_dir / "smollm2_methods.png")
        text = render(results, tiny_side_by_side())
        if earlier is not None:
            text += "\n\n" + compare_table(results, earlier)
        replace_block(args.experiments, BEGIN, END, text)
        print(text)

    return run_cli("bench.experiment.realistic", body)


if __name__ == "__main__":
    sys.exit(main())
