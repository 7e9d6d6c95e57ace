"""The statistics of the experiment: Student-t intervals over seeds, the retained-gain selection rule, the greedy
coordinate ascent, and the summaries (comparisons, sweep, geometry) computed from the raw measurements."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from bench.experiment.design import (
    DENOMINATOR_FLOOR,
    MOVE_MARGIN,
    SAR_GROUPS_FULL,
    SAR_GROUPS_QUICK,
    SAR_START,
    T975,
    KnobGroup,
    compared_methods,
)
from bench.experiment.families import Family

__all__ = [
    "canonical",
    "coordinate_ascent",
    "describe",
    "reference_accuracy",
    "retained_gains",
    "scored_pairs",
    "selection_rule_text",
    "selection_score",
    "summarize",
    "summarize_geometry",
    "t_interval",
]



def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % Student-t interval over seeds (half-width 0 for one value: no spread measurable)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half": None, "lo": None, "hi": None, "n": n, "values": list(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "half": half, "lo": mean - half, "hi": mean + half, "n": n, "values": list(values)}


def canonical(params: dict[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in sorted(params)}


def describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in canonical(params).items()) \
        or "defaults"


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
    blocks = [("defaults", "sar", [n for n in test_rows if n in compared_methods() and n != "sar"])]
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
