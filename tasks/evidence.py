"""The evidence beside each merged version: scores with intervals, paired differences to parents and base, gate
verdicts (paired non-inferiority, sarmerge/stats.py), and the Markdown description a person reads in the MLflow UI.

All comparisons pair the models problem by problem from their per-sample records (`samples.jsonl`: suite, problem id,
verdict) — the job evaluates every model on the same suites with the same seed and limit, so the problems coincide.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from sarmerge.stats import (
    PairedDifference,
    Verdict,
    discordance_upper,
    noninferiority,
    pair_scores,
    paired_difference,
    per_problem_scores,
    problems_needed,
)
from tasks.common import read_json, write_json_atomic
from tasks.params import GateCfg, Params
from tasks.registry import safe_key
from tasks.workspace import Workspace

SUMMARY = "summary.json"
SAMPLES = "samples.jsonl"


@dataclass
class Scored:
    """One model's evaluation: headline score and 95 % interval per suite, avg@k per problem."""

    label: str
    scores: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    per_problem: dict[str, dict[str, float]]
    samples_per_problem: dict[str, int]


@dataclass
class GateResult:
    name: str
    verdict: Verdict
    detail: str
    suite: str = ""
    difference: float = 0.0
    low: float = 0.0
    high: float = 0.0
    margin: float = 0.0
    confidence: float = 0.95
    problems: int = 0
    needed: int = 0
    mcnemar_p: float = 1.0

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def underpowered(self) -> bool:
        """Undecided, and fewer problems than the decision size (a decided gate needed no more)."""
        return self.verdict == "inconclusive" and self.needed > self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "underpowered": self.underpowered}

    def tag_value(self) -> str:
        return (f"{self.verdict} {self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}] margin {self.margin:.3f} "
                f"n={self.problems} needs {self.needed}")


@dataclass
class Evidence:
    method: str
    scores: dict[str, float]
    parents: dict[str, dict[str, float]]
    base: dict[str, float]
    retention: dict[str, float]
    gates: list[GateResult]
    others: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""
    folder: Path = Path()
    ci95: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # model label → suite → interval
    differences: dict[str, dict[str, PairedDifference]] = field(default_factory=dict)  # vs label → suite → diff

    @property
    def verdict(self) -> Verdict:
        """pass when every gate passes, fail when any fails, otherwise inconclusive."""
        if self.gates and all(g.passed for g in self.gates):
            return "pass"
        return "fail" if any(g.verdict == "fail" for g in self.gates) else "inconclusive"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def mean_score(self) -> float:
        return sum(self.scores.values()) / max(1, len(self.scores))


def _read_samples(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SarmergeError(f"{path}: per-sample records missing ({e.strerror}); re-run the evaluate step") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SarmergeError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(r, dict) or "suite" not in r or "id" not in r or not isinstance(r.get("correct"), bool):
            raise SarmergeError(f"{path}:{i}: a sample record needs suite, id and a boolean correct")
        records.append(r)
    return records


def load_evaluation(folder: Path, label: str) -> Scored:
    """Read an evaluation folder (summary.json + samples.jsonl) written by sarmerge.evaluate."""
    from tasks.evaluate import scores

    f = folder / SUMMARY
    if not f.is_file():
        raise SarmergeError(f"{f}: evaluation missing (run the evaluate step for it first)")
    summary = read_json(f)
    headline = scores(summary)
    records = _read_samples(folder / SAMPLES)
    ci = {s: tuple(summary["suites"][s].get("ci95", (0.0, 1.0))) for s in headline}
    per_problem, ks = {}, {}
    for s in headline:
        try:
            per_problem[s], ks[s] = per_problem_scores(records, s)
        except ValueError as e:
            raise SarmergeError(f"{folder / SAMPLES}: {e}") from None
    return Scored(label, headline, ci, per_problem, ks)  # type: ignore[arg-type]


def compare(a: Scored, b: Scored, suite: str, *, confidence: float, seed: int, resamples: int) -> PairedDifference:
    """Paired difference a − b on one suite (same problems required)."""
    if suite not in a.per_problem or suite not in b.per_problem:
        raise SarmergeError(f"suite {suite}: not evaluated for both {a.label} and {b.label}")
    try:
        x, y = pair_scores(a.per_problem[suite], b.per_problem[suite])
    except ValueError as e:
        raise SarmergeError(f"{a.label} vs {b.label} on {suite}: {e}") from None
    k = max(a.samples_per_problem.get(suite, 1), b.samples_per_problem.get(suite, 1))
    return paired_difference(x, y, samples_per_problem=k, confidence=confidence, seed=seed, resamples=resamples)


def gate_result(name: str, suite: str, diff: PairedDifference, margin: float, gate: GateCfg, why: str) -> GateResult:
    verdict = noninferiority(diff, margin)
    needed = problems_needed(max(margin, 1e-3), confidence=gate.confidence, power=gate.power,
                             discordance=discordance_upper(diff))
    pct = f"{gate.confidence:.0%}"
    text = (f"{why}: difference {diff.difference:+.3f}, {pct} interval [{diff.low:+.3f}, {diff.high:+.3f}] on "
            f"{diff.problems} problems, margin −{margin:.3f} → {verdict}")
    if verdict == "pass":
        text += " (the interval lies above −margin)"
    elif verdict == "fail":
        text += " (the interval lies below −margin: worse than allowed)"
    else:
        text += " (the interval straddles −margin)"
    if verdict == "inconclusive" and needed > diff.problems:
        text += f"; underpowered: needs ≈{needed} problems"
    return GateResult(name, verdict, text, suite, diff.difference, diff.low, diff.high, margin, gate.confidence,
                      diff.problems, needed, diff.mcnemar_p)


def evaluate_gates(gate: GateCfg, own_suite: dict[str, str], merged: Scored, parents: dict[str, Scored],
                   base: Scored, *, seed: int = 0) -> tuple[dict[str, float], list[GateResult]]:
    """The gates of params.yaml `gate`: the merge is non-inferior to each parent on the parent's own suite (margin
    `margin`, or the retention margin) and, with `no_suite_below_base`, to the base on every suite (`base_margin`)."""
    retention: dict[str, float] = {}
    gates: list[GateResult] = []
    kw = {"confidence": gate.confidence, "seed": seed, "resamples": gate.resamples}
    for parent, suite in own_suite.items():
        p, m = parents[parent].scores[suite], merged.scores[suite]
        retention[parent] = m / p if p > 0 else 1.0
        margin, why = gate.margin, f"{suite} vs parent {parent}"
        if gate.min_retention is not None:
            gain = p - base.scores[suite]
            if (1 - gate.min_retention) * gain > margin:
                margin = (1 - gate.min_retention) * gain
                why += f" (keep ≥ {gate.min_retention:.0%} of its gain {gain:+.3f} over the base)"
        gates.append(gate_result(f"noninferior:{parent}", suite, compare(merged, parents[parent], suite, **kw),
                                 margin, gate, why))
    if gate.no_suite_below_base:
        for suite in sorted(base.scores):
            gates.append(gate_result(f"vs_base:{suite}", suite, compare(merged, base, suite, **kw), gate.base_margin,
                                     gate, f"{suite} vs base"))
    return retention, gates


def collect(ws: Workspace, method: str) -> Evidence:
    params: Params = ws.params
    job = ws.job
    seed = params.evaluate.seed
    merged = load_evaluation(ws.eval_dir(f"merged/{method}"), f"merged ({method})")
    parents = {p: load_evaluation(ws.eval_dir(f"inputs/{p}"), f"parent {p}") for p in job.parents}
    base = load_evaluation(ws.eval_dir(f"inputs/{job.base}"), "base")
    own_suite = {p: params.evaluate.suites[cfg.domain] for p, cfg in job.parents.items()}
    retention, gates = evaluate_gates(params.gate, own_suite, merged, parents, base, seed=seed)
    others: dict[str, Scored] = {}
    for m in params.merge.methods:
        folder = ws.eval_dir(f"merged/{m}")
        if m != method and (folder / SUMMARY).is_file():
            others[m] = load_evaluation(folder, f"merged ({m})")
    # the paired differences of the table (95 %, whatever the gates' confidence: the table is the reading aid)
    kw = {"confidence": 0.95, "seed": seed, "resamples": params.gate.resamples}
    diffs = {label: {s: compare(merged, other, s, **kw) for s in sorted(merged.scores) if s in other.scores}
             for label, other in [*((f"parent {p}", sc) for p, sc in parents.items()), ("base", base)]}
    k = safe_key
    metrics = {f"eval.{k(s)}": v for s, v in merged.scores.items()}
    metrics |= {f"eval.{k(s)}.ci95_low": v[0] for s, v in merged.ci95.items()}
    metrics |= {f"eval.{k(s)}.ci95_high": v[1] for s, v in merged.ci95.items()}
    metrics |= {f"base.{k(s)}": v for s, v in base.scores.items()}
    metrics |= {f"parent.{p}.{k(s)}": v for p, sc in parents.items() for s, v in sc.scores.items()}
    metrics |= {f"retention.{p}": r for p, r in retention.items()}
    metrics |= {f"gate.{k(g.name)}.low": g.low for g in gates} | {f"gate.{k(g.name)}.high": g.high for g in gates}
    metrics |= {"gates_passed": float(sum(g.passed for g in gates)), "gates_total": float(len(gates)),
                "gates_failed": float(sum(g.verdict == "fail" for g in gates))}
    ev = Evidence(method, merged.scores, {p: sc.scores for p, sc in parents.items()}, base.scores, retention, gates,
                  {m: sc.scores for m, sc in others.items()}, metrics)
    ev.ci95 = {merged.label: merged.ci95, **{sc.label: sc.ci95 for sc in [*others.values(), *parents.values()]},
               "base": base.ci95}
    ev.differences = diffs
    ev.folder = ws.tmp / "evidence" / method
    ev.description = describe(ws, ev)
    write_json_atomic(ev.folder / "comparison.json", {
        "method": method, "scores": merged.scores, "ci95": ev.ci95, "parents": ev.parents, "base": base.scores,
        "retention": retention, "verdict": ev.verdict, "gates": [g.as_dict() for g in gates],
        "paired_differences": {lab: {s: d.as_dict() for s, d in row.items()} for lab, row in diffs.items()},
        "other_methods": ev.others, "job": job.id, "bootstrap_seed": seed,
        "gate_settings": params.gate.model_dump()})
    (ev.folder / "comparison.md").write_text(ev.description)
    return ev


def _score(v: float | None, ci: tuple[float, float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.3f}"


_ICON = {"pass": "✅ pass", "fail": "❌ fail", "inconclusive": "❔ inconclusive"}


def artifact_links(run_id: str | None, experiment_id: str | None) -> str:
    """Links (relative to the MLflow UI) to this version's report and per-sample verdicts."""
    if not run_id:
        return ("Evidence in this version's run: `analysis/report.html`, `evaluation/samples.jsonl` (per-sample "
                "verdicts), `evidence/comparison.json`.")
    page = f"#/experiments/{experiment_id}/runs/{run_id}/artifacts" if experiment_id else ""
    raw = f"get-artifact?run_uuid={run_id}&path="
    links = [f"[analysis report]({raw}analysis/report.html)", f"[per-sample verdicts]({raw}evaluation/samples.jsonl)",
             f"[evidence JSON]({raw}evidence/comparison.json)"]
    if page:
        links.append(f"[all artifacts of the run]({page})")
    return "Evidence: " + " · ".join(links) + "."


def describe(ws: Workspace, ev: Evidence, *, run_id: str | None = None, experiment_id: str | None = None) -> str:
    job, meta, params = ws.job, ws.meta, ws.params
    suites = sorted(ev.scores)
    head = "| model | " + " | ".join(f"`{s}`" for s in suites) + " |\n|---|" + "---|" * len(suites) + "\n"
    label = f"merged ({ev.method})"
    rows = [f"| **{label}** | " + " | ".join(f"**{_score(ev.scores.get(s), ev.ci95.get(label, {}).get(s))}**"
                                             for s in suites) + " |"]
    for m, sc in sorted(ev.others.items()):
        rows.append(f"| merged ({m}) | " + " | ".join(_score(sc.get(s), ev.ci95.get(f"merged ({m})", {}).get(s))
                                                      for s in suites) + " |")
    for p, sc in ev.parents.items():
        name = job.parents[p].model or p
        rows.append(f"| parent `{name}` ({job.parents[p].domain}) | "
                    + " | ".join(_score(sc.get(s), ev.ci95.get(f"parent {p}", {}).get(s)) for s in suites) + " |")
    rows.append(f"| base `{meta.get('base', {}).get('uri', job.base)}` | "
                + " | ".join(_score(ev.base.get(s), ev.ci95.get("base", {}).get(s)) for s in suites) + " |")
    diff_rows = []
    for lab, row in ev.differences.items():
        cells = []
        for s in suites:
            d = row.get(s)
            cells.append("–" if d is None else f"{d.difference:+.3f} [{d.low:+.2f}, {d.high:+.2f}]")
        diff_rows.append(f"| merged − {lab} | " + " | ".join(cells) + " |")
    gate_rows = "\n".join(
        f"| `{g.name}` | {_ICON[g.verdict]} | {g.difference:+.3f} [{g.low:+.3f}, {g.high:+.3f}] | −{g.margin:.3f} | "
        f"{g.problems}{' (needs ≈' + str(g.needed) + ')' if g.underpowered else ''} |" for g in ev.gates)
    why = "\n".join(f"- `{g.name}`: {g.detail}" for g in ev.gates)
    verdict = {"pass": "**all gates pass** — this version may be promoted",
               "fail": "**a gate fails** — the evidence says it is worse than allowed; do not promote without a "
                       "reason",
               "inconclusive": "**inconclusive** — too few problems to tell; evaluate on more problems before "
                               "trusting a promotion"}[ev.verdict]
    short = [g for g in ev.gates if g.underpowered]
    needed = max((g.needed for g in ev.gates), default=0)
    have = min((g.problems for g in ev.gates), default=0)
    size = (f"Decision size (params.yaml `gate.power` {params.gate.power:.0%}, disagreement rate at its 95 % upper "
            f"bound): ≈{needed} problems per suite decide every gate for a merge equal to its parents"
            + (f"; **underpowered**: {', '.join(f'`{g.name}`' for g in short)} undecided on {have} problems"
               if short else "") + ".\n")
    dvc: dict[str, str] = {}
    with contextlib.suppress(SarmergeError):
        dvc = ws.dvc_info()
    repro = ""
    if dvc:
        repro = (f"\n**Reproduce** (bit for bit): `git clone {dvc['repo']} job && cd job && git checkout {dvc['rev']} "
                 f"&& dvc pull` (or `dvc repro`); DVC remote `{dvc['remote']}`.\n")
    n = params.evaluate.limit
    pct = f"{params.gate.confidence:.0%}"
    return (
        f"### `{ev.method}` merge of {', '.join(f'`{p.model or k}`' for k, p in job.parents.items())}\n\n"
        f"Job `{job.id}` ({meta.get('kind', 'merge')}), triggered by `{meta.get('trigger', '?')}`. "
        f"Gate verdict: {verdict}.\n\n"
        f"**Scores** (95 % interval), {n if n else 'all'} problems per suite, greedy, seed {params.evaluate.seed}:\n\n"
        f"{head}" + "\n".join(rows) + "\n\n"
        "**Paired differences** (same problems, 95 % interval; positive = the merge is better):\n\n"
        f"{head.replace('| model |', '| comparison |', 1)}" + "\n".join(diff_rows) + "\n\n"
        f"**Gates** (params.yaml `gate`, paired non-inferiority at {pct}):\n\n"
        f"| gate | verdict | difference [{pct} interval] | margin | problems |\n|---|---|---|---|---|\n"
        f"{gate_rows}\n\n{why}\n\n"
        f"{size}"
        f"{repro}\n{artifact_links(run_id, experiment_id)} To promote, set the alias `champion` on this version.\n"
    )
