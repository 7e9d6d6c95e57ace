"""Update geometry of zoo families against RLVR's reported signatures (issue 14, item 2).

    .venv/bin/python -m bench.geometry_literature --family tiny=DIR --family smollm2-grpo=DIR \
        --json docs/experiments/geometry_literature.json --markdown docs/experiments/geometry_literature.md

For every family (a `sarmerge zoo` output: family.json, base/, specialists) it runs `sarmerge analyze geometry`'s
`analyze_geometry` with eps = 0 — a weight counts as changed only when its bf16 bits differ from the base, the
"sparsity in bf16" real RLVR checkpoints are described by — and the base's top-16 singular subspaces, then writes
the compact numbers (JSON) and a markdown fragment: sparsity, support overlap vs chance, cosine, sign conflict,
principal-energy ratio (two-sided and one-sided), per module kind, and which signature each family reproduces.

Signatures checked (as the issue states them): sparse updates (most weights bit-identical in bf16); off-principal
updates (energy in the base's principal subspace below a random update's share, "The Path Not Taken",
arXiv 2511.08567); RL subnetworks overlapping across seeds above chance (Mukherjee et al., arXiv 2505.11711); and
SAR's premise that different-domain updates are spread apart (overlap at or below chance) and near-orthogonal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench._report import replace_block
from sarmerge.analysis.geometry import analyze_geometry
from sarmerge.errors import SarmergeError, run_cli
from sarmerge.zoo.family import load_family

ROOT = Path(__file__).resolve().parent.parent

TOP_K = 16
BEGIN, END = "<!-- geometry-literature:begin -->", "<!-- geometry-literature:end -->"
MODEL_KEYS = ("sparsity", "rel_norm", "principal_energy", "principal_energy_chance", "principal_energy_ratio",
              "principal_energy_left", "principal_energy_left_chance", "principal_energy_right",
              "principal_energy_right_chance")
PAIR_KEYS = ("jaccard", "jaccard_chance", "overlap_ratio", "cosine", "sign_conflict")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def family_geometry(label: str, root: Path, threads: int) -> dict[str, Any]:
    family = load_family(root)
    members = family["members"]
    t0 = time.perf_counter()
    g = analyze_geometry(root / family["base"]["path"], [root / m["path"] for m in members],
                         names=[m["name"] for m in members], eps=0.0, top_k=TOP_K, threads=threads, progress=False)
    domain = {m["name"]: m["domain"] for m in members}

    def models_of(stats: dict[str, Any]) -> dict[str, dict[str, float | None]]:
        out = {}
        for name, v in stats["models"].items():
            row = {k: v.get(k) for k in MODEL_KEYS}
            row["principal_energy_left_ratio"] = _ratio(v.get("principal_energy_left"),
                                                        v.get("principal_energy_left_chance"))
            row["principal_energy_right_ratio"] = _ratio(v.get("principal_energy_right"),
                                                         v.get("principal_energy_right_chance"))
            out[name] = row
        return out

    def pairs_of(stats: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"a": p["a"], "b": p["b"],
                 "kind": "same domain" if domain[p["a"]] == domain[p["b"]] else "cross domain",
                 **{k: p[k] for k in PAIR_KEYS}} for p in stats["pairs"]]

    return {
        "label": label, "root": str(root), "format": family["format"],
        "trainer": family.get("trainer", {"name": "sarmerge.zoo.train.grpo"}),
        "parameters": family["model"]["parameters"], "numel": g["model"]["numel"],
        "members": [{"name": m["name"], "domain": m["domain"], "task": m["task"], "gain": m["gain"],
                     "before": m["accuracy_before"].get(m["task"]), "after": m["accuracy_after"].get(m["task"]),
                     "test_problems": family["tasks"][m["task"]]["test_problems"],
                     "unchanged_fraction": m.get("unchanged_fraction"), "reward_first_last": m.get("reward_first_last"),
                     "own_task_test": m.get("own_task_test")} for m in members],
        "model": {"models": models_of(g["model"]), "pairs": pairs_of(g["model"])},
        "modules": {mod: {"models": models_of(s), "pairs": pairs_of(s)} for mod, s in g["modules"].items()},
        "layers": {lay: {"models": models_of(s)} for lay, s in g["layers"].items()},
        "settings": {**g["settings"], "note": "eps=0: changed = bf16 bits differ from the base"},
        "timings_s": family.get("timings_s"), "cpu_s": family.get("cpu_s"), "machine": family.get("machine"),
        "config": family.get("config"),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _span(values: list[float | None], fmt: str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1 or min(vals) == max(vals):
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.fmean(vals))} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def verdicts(fam: dict[str, Any]) -> list[str]:
    models = fam["model"]["models"].values()
    pairs = fam["model"]["pairs"]
    sparsity = _mean([m["sparsity"] for m in models])
    principal = _mean([m["principal_energy_ratio"] for m in models])
    same = [p for p in pairs if p["kind"] == "same domain"]
    cross = [p for p in pairs if p["kind"] == "cross domain"]
    same_overlap = _mean([p["overlap_ratio"] for p in same])
    cross_overlap = _mean([p["overlap_ratio"] for p in cross])
    cross_cos = _mean([p["cosine"] for p in cross])

    def yes(flag: bool) -> str:
        return "**yes**" if flag else "**no**"

    lines = [f"- Sparse in bf16: {yes(sparsity is not None and sparsity >= 0.7)} "
             f"({100 * sparsity:.1f} % of weights bit-identical to the base; RLVR checkpoints: most weights)."]
    if principal is not None:
        lines.append(f"- Off-principal: {yes(principal < 1)} (energy in the base's top-{TOP_K} subspace "
                     f"{principal:.2f}× a random update's share; RLVR: below 1).")
    if same_overlap is not None:
        lines.append(f"- Same-domain seeds share their support above chance: {yes(same_overlap > 1)} "
                     f"({same_overlap:.2f}× chance; Mukherjee et al. report overlapping RL subnetworks).")
    if cross_overlap is not None:
        lines.append(f"- Cross-domain supports spread apart (SAR's premise, at or below chance): "
                     f"{yes(cross_overlap <= 1)} ({cross_overlap:.2f}× chance).")
    if cross_cos is not None:
        lines.append(f"- Cross-domain updates near-orthogonal: {yes(abs(cross_cos) < 0.1)} (cosine {cross_cos:+.3f}).")
    return lines


def training_table(families: list[dict[str, Any]]) -> list[str]:
    """Each specialist's own-task gain: paired test on the held-out problems where the family recorded it."""
    out = ["| family | specialist | task | base → specialist (own task) | gain [95 % CI] | McNemar p "
           "(gained/lost) |", "|---|---|---|---|---|---|"]
    for fam in families:
        for m in fam["members"]:
            t = m.get("own_task_test")
            if t is None:
                out.append(f"| {fam['label']} | {m['name']} | {m['task']} | {100 * m['before']:.1f} % → "
                           f"{100 * m['after']:.1f} % (n = {m['test_problems']}) | {100 * m['gain']:+.1f} pts "
                           "(no per-problem record: no paired test) | — |")
                continue
            out.append(f"| {fam['label']} | {m['name']} | {m['task']} | {100 * t['before']:.1f} % → "
                       f"{100 * t['after']:.1f} % (n = {t['problems']}) | {100 * t['gain']:+.1f} pts "
                       f"[{100 * t['ci95'][0]:+.1f}, {100 * t['ci95'][1]:+.1f}] | {t['mcnemar_p']:.3g} "
                       f"({t['gained']}/{t['lost']}){' significant' if t['significant'] else ''} |")
    for fam in families:
        if fam.get("timings_s"):
            machine = fam.get("machine") or {}
            cpu = (fam.get("cpu_s") or {}).get("total")
            out.append(f"\n{fam['label']}: built in {fam['timings_s'].get('total', 0):.0f} s wall"
                       + (f", {cpu:.0f} s CPU" if cpu is not None else "")
                       + f" ({machine.get('device', 'cpu')}, {machine.get('torch_threads', '?')} torch thread(s), "
                       f"{machine.get('cpu_count', '?')} CPUs).")
    return out


def markdown(families: list[dict[str, Any]]) -> str:
    out = [*training_table(families), ""]
    out += ["| family (trainer) | specialist | sparsity in bf16 | principal-energy ratio (2-sided) | left | right |"
           " rel. norm |", "|---|---|---|---|---|---|---|"]
    for fam in families:
        for name, m in fam["model"]["models"].items():
            out.append(f"| {fam['label']} ({fam['trainer']['name']}) | {name} | {100 * m['sparsity']:.1f} % | "
                       f"{_fmt(m['principal_energy_ratio'], '{:.2f}×')} | "
                       f"{_fmt(m['principal_energy_left_ratio'], '{:.2f}×')} | "
                       f"{_fmt(m['principal_energy_right_ratio'], '{:.2f}×')} | {_fmt(m['rel_norm'], '{:.2e}')} |")
    out += ["", "| family | pair kind | pairs | Jaccard | chance | overlap / chance | cosine | sign conflict |",
            "|---|---|---|---|---|---|---|---|"]
    for fam in families:
        for kind in ("same domain", "cross domain"):
            ps = [p for p in fam["model"]["pairs"] if p["kind"] == kind]
            if not ps:
                continue
            out.append(f"| {fam['label']} | {kind} | {len(ps)} | {_span([p['jaccard'] for p in ps], '{:.3f}')} | "
                       f"{_span([p['jaccard_chance'] for p in ps], '{:.3f}')} | "
                       f"{_span([p['overlap_ratio'] for p in ps], '{:.2f}×')} | "
                       f"{_span([p['cosine'] for p in ps], '{:+.3f}')} | "
                       f"{_span([_pct(p['sign_conflict']) for p in ps], '{:.1f} %')} |")
    out += ["", "Per module kind (mean over the family's specialists; cross-domain overlap / chance):", "",
            "| family | module | sparsity in bf16 | principal-energy ratio | cross-domain overlap / chance |",
            "|---|---|---|---|---|"]
    for fam in families:
        for mod, s in sorted(fam["modules"].items()):
            ms = list(s["models"].values())
            cross = [p["overlap_ratio"] for p in s["pairs"] if p["kind"] == "cross domain"]
            out.append(f"| {fam['label']} | {mod} | {_fmt(_pct(_mean([m['sparsity'] for m in ms])), '{:.1f} %')} | "
                       f"{_fmt(_mean([m['principal_energy_ratio'] for m in ms]), '{:.2f}×')} | "
                       f"{_fmt(_mean(cross), '{:.2f}×')} |")
    out += ["", "Per transformer block (mean over specialists): how sparsity and principal energy vary with depth.", ""]
    for fam in families:
        rows = []
        for lay, s in fam["layers"].items():
            if lay == "non-layer":
                continue
            ms = list(s["models"].values())
            rows.append((int(lay), _mean([m["sparsity"] for m in ms]),
                         _mean([m["principal_energy_ratio"] for m in ms])))
        if not rows:
            continue
        sp = [r for r in rows if r[1] is not None]
        pr = [r for r in rows if r[2] is not None]
        line = f"- {fam['label']}: {len(rows)} blocks"
        if sp:
            lo, hi = min(sp, key=lambda r: r[1]), max(sp, key=lambda r: r[1])
            line += f"; sparsity {100 * lo[1]:.1f} % (block {lo[0]}) to {100 * hi[1]:.1f} % (block {hi[0]})"
        if pr:
            lo, hi = min(pr, key=lambda r: r[2]), max(pr, key=lambda r: r[2])
            line += f"; principal-energy ratio {lo[2]:.2f}× (block {lo[0]}) to {hi[2]:.2f}× (block {hi[0]})"
        out.append(line + ".")
    for fam in families:
        out += ["", f"**{fam['label']}** ({fam['parameters']:,} parameters, {fam['trainer']['name']}):", ""]
        out += verdicts(fam)
    return "\n".join(out) + "\n"


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _fmt(x: float | None, fmt: str) -> str:
    return "—" if x is None else fmt.format(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", required=True, metavar="LABEL=DIR",
                   help="a built zoo family (repeat for several)")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "experiments" / "geometry_literature.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "experiments" / "geometry_literature.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--experiments", type=Path, default=None,
                   help=f"also replace the text between {BEGIN} and {END} in this file (EXPERIMENTS.md)")
    args = p.parse_args(argv)

    def body() -> None:
        specs = [f.split("=", 1) for f in args.family]
        if any(len(s) != 2 for s in specs):
            raise SarmergeError(f"--family {args.family}: give LABEL=DIR")
        families = [family_geometry(label, Path(d), args.threads) for label, d in specs]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        compact = [{k: v for k, v in f.items() if k != "layers"} | {"layers": f["layers"]} for f in families]
        args.json.write_text(json.dumps(compact, indent=1) + "\n")
        text = markdown(families)
        args.markdown.write_text(text)
        if args.experiments is not None:
            replace_block(args.experiments, BEGIN, END, text)
        print(text)

    return run_cli("geometry_literature", body)


if __name__ == "__main__":
    sys.exit(main())
