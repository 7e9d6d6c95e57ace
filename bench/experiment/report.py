"""The experiment's plots and its markdown report (EXPERIMENTS.md), rendered from results.json alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.experiment.design import Options
from bench.experiment.statistics import _differs, canonical, describe, t_interval

__all__ = [
    "compact",
    "crosscheck_sentence",
    "family_sentence",
    "fisher_differences",
    "fisher_effect",
    "geometry_verdict",
    "make_plots",
    "regime_retained",
    "regime_sentence",
    "render_report",
    "reuse_note",
    "summary_lines",
    "verdicts",
]



# sections 1-4 are the tiny family's; the realistic family has its own driver and section (kept across reruns)
REALISTIC_POINTER = (
    "Sections 1–4 measure the tiny zoo family. The geometry against RLVR's signatures for both families and the "
    "experiment on the RLVR-realistic SmolLM2 family (TRL GRPO) follow in the sections after them "
    "(`python -m bench.geometry_literature`, `python -m bench.experiment.realistic`)."
)


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
    w("```\n.venv/bin/python -m bench.experiment --out bench/results/experiment\n```\n")
    w(f"Run on {results['machine']}, torch {results['torch']}, {results['threads']} threads, git "
      f"`{results['git_revision']}`; wall time {results['timings_s']['total'] / 60:.1f} min "
      f"({results['merges']} merges through the engine{reuse_note(results)}). Raw numbers: "
      "`bench/results/experiment/results.json` (a copy: `docs/experiments/results.json`).\n")
    w(f"{REALISTIC_POINTER}\n")

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


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """results.json without the bulky per-config validation accuracies (the committed copy)."""
    out = dict(results)
    out["sweep"] = {**results["sweep"], "configs": [{k: c[k] for k in ("config", "score", "per_seed")}
                                                     for c in results["sweep"]["configs"]]}
    out["geometry"] = {"summary": results["geometry"]["summary"]}
    return out
