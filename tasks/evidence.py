"""The evidence beside each merged version: scores against parents and base, retention, gate verdicts, and the
Markdown description a person reads in the MLflow UI before promoting."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from sarmerge.errors import SarmergeError
from tasks.common import read_json, write_json_atomic
from tasks.params import GateCfg, Params
from tasks.registry import safe_key
from tasks.workspace import Workspace

SUMMARY = "summary.json"


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str


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

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def mean_score(self) -> float:
        return sum(self.scores.values()) / max(1, len(self.scores))


def _scores(folder: Path) -> dict[str, float]:
    from tasks.evaluate import scores

    f = folder / SUMMARY
    if not f.is_file():
        raise SarmergeError(f"{f}: evaluation missing (run the evaluate step for it first)")
    return scores(read_json(f))


def evaluate_gates(gate: GateCfg, own_suite: dict[str, str], merged: dict[str, float],
                   parents: dict[str, dict[str, float]], base: dict[str, float]) -> tuple[dict[str, float],
                                                                                         list[GateResult]]:
    """Gate rules of params.yaml: each parent's own-domain score retained ≥ min_retention, no suite below the base."""
    retention: dict[str, float] = {}
    gates: list[GateResult] = []
    for parent, suite in own_suite.items():
        p_score, m_score = parents[parent][suite], merged[suite]
        ratio = m_score / p_score if p_score > 0 else 1.0
        retention[parent] = ratio
        gates.append(GateResult(f"retention:{parent}", ratio >= gate.min_retention,
                                f"{suite} {m_score:.3f} vs parent {p_score:.3f} = {ratio:.0%} "
                                f"(need ≥ {gate.min_retention:.0%})"))
    if gate.no_suite_below_base:
        for suite, b in sorted(base.items()):
            m = merged[suite]
            gates.append(GateResult(f"vs_base:{suite}", m >= b - gate.base_margin,
                                    f"{suite} {m:.3f} vs base {b:.3f} (margin {gate.base_margin:.3f})"))
    return retention, gates


def collect(ws: Workspace, method: str) -> Evidence:
    params: Params = ws.params
    job = ws.job
    merged = _scores(ws.eval_dir(f"merged/{method}"))
    parents = {p: _scores(ws.eval_dir(f"inputs/{p}")) for p in job.parents}
    base = _scores(ws.eval_dir(f"inputs/{job.base}"))
    own_suite = {p: params.evaluate.suites[cfg.domain] for p, cfg in job.parents.items()}
    retention, gates = evaluate_gates(params.gate, own_suite, merged, parents, base)
    others = {}
    for m in params.merge.methods:
        folder = ws.eval_dir(f"merged/{m}")
        if m != method and (folder / SUMMARY).is_file():
            others[m] = _scores(folder)
    k = safe_key
    metrics = {f"eval.{k(s)}": v for s, v in merged.items()}
    metrics |= {f"base.{k(s)}": v for s, v in base.items()}
    metrics |= {f"parent.{p}.{k(s)}": v for p, sc in parents.items() for s, v in sc.items()}
    metrics |= {f"retention.{p}": r for p, r in retention.items()}
    metrics |= {"gates_passed": float(sum(g.passed for g in gates)), "gates_total": float(len(gates))}
    ev = Evidence(method, merged, parents, base, retention, gates, others, metrics)
    ev.folder = ws.tmp / "evidence" / method
    ev.description = describe(ws, ev)
    write_json_atomic(ev.folder / "comparison.json", {
        "method": method, "scores": merged, "parents": parents, "base": base, "retention": retention,
        "gates": [g.__dict__ for g in gates], "other_methods": others, "job": job.id})
    (ev.folder / "comparison.md").write_text(ev.description)
    return ev


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def describe(ws: Workspace, ev: Evidence) -> str:
    job, meta = ws.job, ws.meta
    suites = sorted(ev.scores)
    head = "| model | " + " | ".join(f"`{s}`" for s in suites) + " |\n|---|" + "---|" * len(suites) + "\n"
    rows = [f"| **merged ({ev.method})** | " + " | ".join(f"**{_fmt(ev.scores.get(s))}**" for s in suites) + " |"]
    for m, sc in sorted(ev.others.items()):
        rows.append(f"| merged ({m}) | " + " | ".join(_fmt(sc.get(s)) for s in suites) + " |")
    for p, sc in ev.parents.items():
        label = job.parents[p].model or p
        rows.append(f"| parent `{label}` ({job.parents[p].domain}) | " + " | ".join(_fmt(sc.get(s)) for s in suites)
                    + " |")
    rows.append(f"| base `{meta.get('base', {}).get('uri', job.base)}` | "
                + " | ".join(_fmt(ev.base.get(s)) for s in suites) + " |")
    gates = "\n".join(f"- {'✅' if g.passed else '❌'} `{g.name}`: {g.detail}" for g in ev.gates)
    verdict = "all gates hold" if ev.passed else "**gates failed** — do not promote without a reason"
    dvc = {}
    with contextlib.suppress(SarmergeError):
        dvc = ws.dvc_info()
    repro = ""
    if dvc:
        repro = (f"\n**Reproduce** (bit for bit): `git clone {dvc['repo']} job && cd job && git checkout {dvc['rev']} "
                 f"&& dvc pull` (or `dvc repro`); DVC remote `{dvc['remote']}`.\n")
    n = ws.params.evaluate.limit
    return (
        f"### `{ev.method}` merge of {', '.join(f'`{p.model or k}`' for k, p in job.parents.items())}\n\n"
        f"Job `{job.id}` ({meta.get('kind', 'merge')}), triggered by `{meta.get('trigger', '?')}`; {verdict}.\n\n"
        f"{head}" + "\n".join(rows) + "\n\n"
        f"Scores: accuracy / pass@1 on {n if n else 'all'} problems per suite, greedy, seed "
        f"{ws.params.evaluate.seed}.\n\n**Gates** (params.yaml `gate`):\n{gates}\n{repro}\n"
        "Evidence in this version's run: `evaluation/` (per-sample verdicts), `analysis/report.html` (update "
        "geometry), "
        "`evidence/comparison.json`. To promote, set the alias `champion` on this version.\n"
    )
