"""PNG plots for the geometry and token reports.

Uses matplotlib's object API on the Agg canvas (no pyplot), so importing this never changes a user's backend and works
headless. Every plot function returns a `Plot` (file name, title, caption) for the report page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

DPI = 110
ANNOTATE_MAX_CELLS = 400


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    caption: str


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def _arr(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _ratio_norm(data: np.ndarray) -> LogNorm:
    """Log colour scale symmetric about 1 (chance), at least 0.5–2 wide so noise around chance stays white."""
    finite = data[np.isfinite(data) & (data > 0)]
    span = max(2.0, float(np.max(np.maximum(finite, 1 / finite))) if finite.size else 2.0)
    return LogNorm(vmin=1 / span, vmax=span)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "–"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100 or a < 0.01:
        return f"{v:.1e}"
    return f"{v:.2f}"


def _heatmap(
    ax: Any,
    fig: Figure,
    data: np.ndarray,
    rows: list[str],
    cols: list[str],
    *,
    title: str,
    norm: Normalize,
    cmap: str,
    cbar_label: str,
    xlabel: str,
    ylabel: str | None,
) -> None:
    masked = np.ma.masked_invalid(np.where(data > 0, data, np.nan) if isinstance(norm, LogNorm) else data)
    cm = colormaps[cmap].with_extremes(bad="#dddddd")
    im = ax.imshow(masked, aspect="auto", cmap=cm, norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 24 else 8)
    ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02)
    if cbar_label:
        bar.set_label(cbar_label, fontsize=8)
    if isinstance(norm, LogNorm):
        ticks = np.geomspace(norm.vmin, norm.vmax, 5)
        bar.set_ticks(ticks, labels=[f"{t:.2g}×" for t in ticks])
        bar.ax.minorticks_off()
    bar.ax.tick_params(labelsize=7)
    if data.size <= ANNOTATE_MAX_CELLS and len(cols) <= 8:
        for (r, c), v in np.ndenumerate(data):
            ok = math.isfinite(v) and (v > 0 or not isinstance(norm, LogNorm))
            red, green, blue, _ = cm(norm(v)) if ok else (0.87, 0.87, 0.87, 1)
            # Text colour by the cell's luminance, so values stay legible on every colormap.
            color = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(c, r, _fmt(v), ha="center", va="center", fontsize=6 if len(rows) > 16 else 7, color=color)


def _layer_rows(report: dict[str, Any]) -> list[str]:
    return list(report["layers"])


# ---------------------------------------------------------------- geometry

MODEL_METRICS = (
    ("sparsity", "sparsity (share |τ| ≤ ε)", "viridis", "unit"),
    ("rel_norm", "‖τ‖ / ‖θ₀‖", "magma", "auto"),
    ("principal_energy_ratio", "top-k subspace energy / chance", "RdBu_r", "ratio"),
)
PAIR_METRICS = (
    ("jaccard", "support Jaccard", "viridis", "unit"),
    ("overlap_ratio", "Jaccard / chance", "RdBu_r", "ratio"),
    ("cosine", "cosine of task vectors", "RdBu_r", "cosine"),
    ("sign_conflict", "sign conflict on overlap", "viridis", "unit"),
    ("orth_energy_share", "orthogonal energy share", "viridis", "unit"),
)


def _norm_for(kind: str, data: np.ndarray) -> Normalize:
    if kind == "unit":
        return Normalize(0.0, 1.0)
    if kind == "ratio":
        return _ratio_norm(data)
    if kind == "cosine":
        return Normalize(-1.0, 1.0)
    finite = data[np.isfinite(data)]
    return Normalize(float(finite.min()) if finite.size else 0, float(finite.max()) if finite.size else 1)


def plot_layer_models(report: dict[str, Any], path: Path) -> Plot:
    rows, labels = _layer_rows(report), report["labels"]
    fig = Figure(
        layout="constrained", figsize=(3.3 * len(MODEL_METRICS) + 0.6 * len(labels), max(3.5, 0.28 * len(rows) + 1.8))
    )
    axes = fig.subplots(1, len(MODEL_METRICS), sharey=True)
    for k, (ax, (key, title, cmap, kind)) in enumerate(zip(axes, MODEL_METRICS, strict=True)):
        data = np.array([[_nan(report["layers"][r]["models"][m][key]) for m in labels] for r in rows])
        _heatmap(
            ax,
            fig,
            data,
            rows,
            labels,
            title=title,
            norm=_norm_for(kind, data),
            cmap=cmap,
            cbar_label="",
            xlabel="model",
            ylabel="layer" if k == 0 else None,
        )
    fig.suptitle(
        f"Per-layer update metrics per model (ε = {report['settings']['eps']:g}, k = {report['settings']['top_k']})",
        fontsize=11,
    )
    _save(fig, path)
    return Plot(
        path.name,
        "Per-layer metrics per model",
        "Rows are transformer blocks (non-layer = embeddings, final norm, LM head). Sparsity = share of "
        "weights the update leaves unchanged; ‖τ‖/‖θ₀‖ = relative update size; top-k subspace energy / chance "
        "< 1 (blue) means the update avoids the base matrix's principal directions.",
    )


def plot_layer_pairs(report: dict[str, Any], path: Path) -> Plot:
    rows, labels = _layer_rows(report), report["labels"]
    pairs = [(p["a"], p["b"]) for p in report["model"]["pairs"]]
    cols = [f"{a} vs {b}" for a, b in pairs]
    fig = Figure(
        layout="constrained", figsize=(3.0 * len(PAIR_METRICS) + 0.6 * len(cols), max(3.5, 0.28 * len(rows) + 1.8))
    )
    axes = fig.subplots(1, len(PAIR_METRICS), sharey=True)
    for k, (ax, (key, title, cmap, kind)) in enumerate(zip(axes, PAIR_METRICS, strict=True)):
        data = np.array([[_nan(p[key]) for p in report["layers"][r]["pairs"]] for r in rows])
        _heatmap(
            ax,
            fig,
            data,
            rows,
            cols,
            title=title,
            norm=_norm_for(kind, data),
            cmap=cmap,
            cbar_label="",
            xlabel="model pair",
            ylabel="layer" if k == 0 else None,
        )
    fig.suptitle(f"Per-layer overlap and orthogonality of update pairs ({len(labels)} models)", fontsize=11)
    _save(fig, path)
    return Plot(
        path.name,
        "Per-layer metrics per model pair",
        "Jaccard of the supports, and its ratio to the chance level of independent supports (blue < 1: the "
        "updates avoid each other); cosine near 0 and orthogonal energy share near 1 mean nearly orthogonal "
        "task vectors; sign conflict is measured where both models moved (0.5 = random signs).",
    )


def plot_pair_matrices(report: dict[str, Any], path: Path) -> Plot:
    labels = report["labels"]
    n = len(labels)
    index = {m: i for i, m in enumerate(labels)}
    fig = Figure(layout="constrained", figsize=(3.4 * len(PAIR_METRICS), 3.2 + 0.15 * n))
    axes = fig.subplots(1, len(PAIR_METRICS))
    diagonal = {"jaccard": 1.0, "overlap_ratio": np.nan, "cosine": 1.0, "sign_conflict": 0.0, "orth_energy_share": 0.0}
    for ax, (key, title, cmap, kind) in zip(axes, PAIR_METRICS, strict=True):
        data = np.full((n, n), np.nan)
        np.fill_diagonal(data, diagonal[key])
        for p in report["model"]["pairs"]:
            i, j = index[p["a"]], index[p["b"]]
            data[i, j] = data[j, i] = _nan(p[key])
        off = data[~np.eye(n, dtype=bool)]
        norm = _norm_for(kind, off if kind != "unit" else data)
        _heatmap(
            ax,
            fig,
            data,
            labels,
            labels,
            title=title,
            norm=norm,
            cmap=cmap,
            cbar_label="",
            xlabel="model",
            ylabel="model" if key == PAIR_METRICS[0][0] else None,
        )
    fig.suptitle("Whole-model pairwise metrics", fontsize=11)
    _save(fig, path)
    return Plot(
        path.name,
        "Whole-model pair matrices",
        "Each cell compares two models' task vectors over all weights (grey = undefined).",
    )


def plot_sparsity_hist(report: dict[str, Any], path: Path) -> Plot:
    labels = report["labels"]
    eps = report["settings"]["eps"]
    fig = Figure(layout="constrained", figsize=(12, 4))
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.linspace(0, 1, 21)
    for m in labels:
        vals = [t["models"][m]["sparsity"] for t in report["tensors"]]
        ax1.hist(
            vals,
            bins=bins,
            histtype="step",
            linewidth=1.8,
            label=f"{m} (model: {report['model']['models'][m]['sparsity']:.1%})",
        )
    ax1.set_xlabel("per-tensor sparsity (share of weights with |τ| ≤ ε)")
    ax1.set_ylabel("number of tensors")
    ax1.set_title("Sparsity of each tensor's update")
    ax1.set_xlim(0, 1)
    ax1.legend(fontsize=8)
    hist = report["magnitude_histogram"]
    edges = np.array(hist["log10_bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    for m in labels:
        counts = np.array(hist["counts"][m])
        total = counts.sum() + hist["exact_zeros"][m]
        share = counts / max(total, 1)
        ax2.plot(
            centers,
            share,
            drawstyle="steps-mid",
            linewidth=1.5,
            label=f"{m} (exact zeros: {hist['exact_zeros'][m] / max(total, 1):.1%})",
        )
    if eps > 0:
        ax2.axvline(math.log10(eps), color="black", linestyle="--", linewidth=1)
        ax2.text(math.log10(eps), ax2.get_ylim()[1] * 0.95, f" ε = {eps:g}", fontsize=8, va="top")
    ax2.set_xlabel("log10 |τ| (non-zero entries)")
    ax2.set_ylabel("share of all weights")
    ax2.set_title("Update magnitudes (exact zeros not shown)")
    ax2.legend(fontsize=8)
    _save(fig, path)
    return Plot(
        path.name,
        "Sparsity histogram",
        "Left: how many tensors have a given share of unchanged weights. Right: distribution of non-zero "
        "update magnitudes; entries left of the dashed line count as unchanged.",
    )


# Display order of module kinds in a block (unknown kinds follow in name order).
MODULE_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_proj.bias",
    "k_proj.bias",
    "v_proj.bias",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


def _module_key(module: str) -> tuple[int, str]:
    return (MODULE_ORDER.index(module), "") if module in MODULE_ORDER else (len(MODULE_ORDER), module)


def plot_module_sparsity(report: dict[str, Any], path: Path) -> Plot:
    labels = report["labels"]
    layer_tensors = [t for t in report["tensors"] if t["layer"] is not None]
    modules = sorted({t["module"] for t in layer_tensors}, key=_module_key)
    layers = sorted({t["layer"] for t in layer_tensors})
    ncols = min(3, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig = Figure(
        layout="constrained",
        figsize=(max(4.5, 0.42 * len(modules) + 1.6) * ncols, max(3.2, 0.24 * len(layers) + 1.8) * nrows),
    )
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[len(labels) :]:
        ax.set_visible(False)
    for k, (ax, m) in enumerate(zip(axes, labels, strict=False)):
        data = np.full((len(layers), len(modules)), np.nan)
        for t in layer_tensors:
            data[layers.index(t["layer"]), modules.index(t["module"])] = _nan(t["models"][m]["sparsity"])
        _heatmap(
            ax,
            fig,
            data,
            [str(x) for x in layers],
            modules,
            title=f"{m}",
            norm=Normalize(0, 1),
            cmap="viridis",
            cbar_label="",
            xlabel="module",
            ylabel="layer" if k % ncols == 0 else None,
        )
    fig.suptitle("Sparsity of the update per layer and module (share of weights with |τ| ≤ ε)", fontsize=11)
    _save(fig, path)
    return Plot(path.name, "Sparsity per layer and module", "Which blocks and projections each RL run left untouched.")


def _nan(v: float | None) -> float:
    return np.nan if v is None else float(v)


def geometry_plots(report: dict[str, Any], out: Path) -> list[Plot]:
    plots = [plot_layer_models(report, out / "geometry_layers_models.png")]
    if len(report["labels"]) >= 2:
        plots.append(plot_layer_pairs(report, out / "geometry_layers_pairs.png"))
        plots.append(plot_pair_matrices(report, out / "geometry_pair_matrices.png"))
    plots.append(plot_sparsity_hist(report, out / "geometry_sparsity_hist.png"))
    if any(t["layer"] is not None for t in report["tensors"]):
        plots.append(plot_module_sparsity(report, out / "geometry_module_sparsity.png"))
    return plots


# ---------------------------------------------------------------- tokens


def plot_js_hist(report: dict[str, Any], records: list[dict[str, Any]], path: Path) -> Plot:
    s = report["summary"]
    js = np.concatenate([r["js"] for r in records])
    floor = 1e-8
    fig = Figure(layout="constrained", figsize=(7, 4))
    ax = fig.subplots()
    bins = np.logspace(math.log10(floor), 0, 41)
    ax.hist(np.clip(js, floor, 1.0), bins=bins, color="#4477aa")
    ax.set_xscale("log")
    ax.axvline(s["near_zero_threshold"], color="black", linestyle="--", linewidth=1)
    ax.text(
        0.02,
        0.95,
        f"near-zero (≤ {s['near_zero_threshold']:g} bits): {s['near_zero_share']:.1%} of "
        f"{s['positions']} positions\nmean {s['js_mean']:.3g}, median {s['js_median']:.3g}, max {s['js_max']:.3g}",
        transform=ax.transAxes,
        fontsize=8,
        va="top",
    )
    ax.set_xlabel(f"JS divergence, RL vs base next-token distribution (bits; values < {floor:g} shown at {floor:g})")
    ax.set_ylabel("response positions")
    ax.set_title("Where does the RL model's prediction differ from the base's?")
    _save(fig, path)
    return Plot(
        path.name,
        "JS divergence per position",
        "Most positions sit left of the dashed line when RL changed the model's predictions only sparsely.",
    )


def plot_position_profile(report: dict[str, Any], path: Path) -> Plot:
    prof = report["position_profile"]
    edges = np.array(prof["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    fig = Figure(layout="constrained", figsize=(8, 4))
    ax = fig.subplots()
    for (name, lo, hi), color in zip(report_buckets(report), ("#e8f0fa", "#f5f5f5", "#faeee8"), strict=True):
        ax.axvspan(lo, hi, color=color, zorder=0)
        b = report["position_buckets"][name]
        share = "–" if b["share_of_large"] is None else f"{b['share_of_large']:.0%}"
        ax.text(
            (lo + hi) / 2,
            0.98,
            f"{name}\n{share} of top-decile JS",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
        )
    ax.bar(centers, _arr(prof["js_mean"]), width=0.08, color="#4477aa", label="mean JS (bits)", zorder=2)
    ax.set_xlabel("relative position in the response (0 = first token, 1 = last)")
    ax.set_ylabel("mean JS divergence (bits)")
    ax.set_xlim(0, 1)
    ymax = np.nanmax(_arr(prof["js_mean"])) if prof["js_mean"] else 0
    ax.set_ylim(0, (ymax if ymax and np.isfinite(ymax) else 1e-3) * 1.45)
    ax2 = ax.twinx()
    ax2.plot(centers, _arr(prof["non_near_zero_share"]), color="#cc6677", marker="o", label="share above threshold")
    ax2.set_ylim(0, 1.4)  # headroom above 1 keeps the bucket labels clear of the line
    ax2.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax2.set_ylabel("share of positions above the near-zero threshold", color="#cc6677")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(
        handles,
        [h.get_label() for h in handles],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncol=2,
        frameon=False,
    )
    ax.set_title("Divergence along the response")
    _save(fig, path)
    return Plot(
        path.name,
        "Divergence by position",
        "Bars: mean JS per tenth of the response; line: share of positions that are not near-zero; "
        "shaded thirds: start / middle / end with the share of the top-decile JS positions they hold.",
    )


def report_buckets(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    return [(name, *b["range"]) for name, b in report["position_buckets"].items()]


def plot_dlogp_hist(report: dict[str, Any], records: list[dict[str, Any]], path: Path) -> Plot:
    s = report["summary"]
    d = np.concatenate([r["dlogp"] for r in records])
    fig = Figure(layout="constrained", figsize=(7, 4))
    ax = fig.subplots()
    lim = max(float(np.abs(d).max()), 1e-6)
    ax.hist(d, bins=np.linspace(-lim, lim, 41), color="#228833")
    ax.set_yscale("log")  # RLVR piles most positions at 0; a log axis keeps the tails visible
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axvline(0, color="black", linewidth=1)
    ax.text(
        0.02,
        0.95,
        f"mean {s['dlogp_mean']:+.3g}, median {s['dlogp_median']:+.3g}\n"
        f"RL more confident: {s['dlogp_positive_share']:.1%}, less: {s['dlogp_negative_share']:.1%}",
        transform=ax.transAxes,
        fontsize=8,
        va="top",
    )
    ax.set_xlabel("Δ log p of the chosen token = log p_RL − log p_base (nats)")
    ax.set_ylabel("response positions (log scale)")
    ax.set_title("How much more likely RL makes its own tokens")
    _save(fig, path)
    return Plot(
        path.name,
        "Δ log p of chosen tokens",
        "Right of 0: the RL model made its chosen token more likely than the base would have.",
    )


def plot_traces(report: dict[str, Any], records: list[dict[str, Any]], path: Path, count: int = 4) -> Plot:
    shown = records[:count]
    thr = report["summary"]["near_zero_threshold"]
    all_js = np.concatenate([r["js"] for r in shown])
    floor = max(1e-8, min(float(all_js.min()), thr) / 10)
    fig = Figure(layout="constrained", figsize=(10, 1.9 * len(shown) + 0.8))
    axes = np.atleast_1d(fig.subplots(len(shown), 1, sharex=False))
    for ax, r in zip(axes, shown, strict=True):
        js = np.clip(r["js"], floor, 1.0)
        ax.plot(np.arange(len(js)), js, color="#4477aa", linewidth=1)
        ax.scatter(np.arange(len(js)), js, s=6, c=np.where(r["in_topk"], "#4477aa", "#cc3311"), zorder=3)
        ax.axhline(thr, color="black", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(floor, 1.5)
        ax.set_ylabel("JS (bits)", fontsize=8)
        if len(js) <= 64:
            # Short responses: label each position with its token, so a spike reads as a word.
            ax.set_xticks(
                range(len(js)),
                [repr(t)[1:-1] or "∅" for t in r["tokens"]],
                rotation=0 if len(js) <= 20 else 90,
                fontsize=7 if len(js) <= 20 else 6,
            )
        prompt = r["prompt"].replace("\n", " ")
        ax.set_title(f"response {r['index']}: {prompt[:70]!r}", fontsize=8, loc="left")
    axes[-1].set_xlabel(
        "position in the response, labelled by the generated token when short "
        "(red dots: RL top token outside the base top-k)"
    )
    fig.suptitle("JS divergence along individual responses", fontsize=11)
    _save(fig, path)
    return Plot(
        path.name,
        "Per-response traces",
        "Spikes are the few positions where RL training changed the "
        "model's decision; the dashed line is the near-zero threshold.",
    )


def token_plots(report: dict[str, Any], records: list[dict[str, Any]], out: Path) -> list[Plot]:
    return [
        plot_js_hist(report, records, out / "tokens_js_hist.png"),
        plot_position_profile(report, out / "tokens_position.png"),
        plot_dlogp_hist(report, records, out / "tokens_dlogp_hist.png"),
        plot_traces(report, records, out / "tokens_traces.png"),
    ]
