"""Render geometry and/or token reports as one self-contained page (HTML and Markdown, PNGs embedded as base64).

Each analysis directory holds `report.json` (with a `plots` list) and its PNGs; the page reads them back, so the same
renderer serves a single analysis and the combined page the pipeline logs to MLflow.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sarmerge import __version__
from sarmerge.errors import SarmergeError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.glance{background:#f6f9fc;border-left:4px solid #4477aa;padding:.6em 1em}.tok{white-space:pre-wrap;
font-family:ui-monospace,monospace;font-size:.9em;background:#fafafa;padding:.6em;border:1px solid #eee}
.small{font-size:.85em;color:#555}
"""


def load_analysis(directory: str | Path) -> dict[str, Any]:
    """Read an analysis directory's report.json (geometry or tokens)."""
    f = Path(directory) / "report.json"
    try:
        data = json.loads(f.read_text())
    except OSError as e:
        raise SarmergeError(f"{f}: cannot read analysis report: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise SarmergeError(f"{f}: invalid JSON: {e}") from e
    if data.get("kind") not in ("geometry", "tokens"):
        raise SarmergeError(f"{f}: not a sarmerge analysis report (kind = {data.get('kind')!r})")
    data["_dir"] = str(Path(directory))
    return data


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: float | None, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, fmt)


def _png_b64(directory: str, name: str) -> str:
    f = Path(directory) / name
    try:
        return base64.b64encode(f.read_bytes()).decode()
    except OSError as e:
        raise SarmergeError(f"{f}: plot missing: {e.strerror}") from e


# ---------------------------------------------------------------- content shared by both formats


def _vs_chance(ratio: float | None, below: str, above: str) -> str:
    """Words for a ratio to chance; within ±20 % of 1 reads as chance (sampling noise on small tensors)."""
    if ratio is None:
        return "undefined"
    if ratio < 0.8:
        return below
    if ratio > 1.25:
        return above
    return "about chance"


def _layer_range(g: dict[str, Any], label: str) -> str:
    layers = [
        (k, v["models"][label]["sparsity"])
        for k, v in g["layers"].items()
        if v["models"][label]["sparsity"] is not None and k != "non-layer"
    ]
    if len(layers) < 2:
        return ""
    (lo_k, lo), (hi_k, hi) = min(layers, key=lambda x: x[1]), max(layers, key=lambda x: x[1])
    return f", per layer from {_pct(lo)} (layer {lo_k}) to {_pct(hi)} (layer {hi_k})"


def geometry_glance(g: dict[str, Any]) -> list[str]:
    lines = []
    eps, k = g["settings"]["eps"], g["settings"]["top_k"]
    for label, m in g["model"]["models"].items():
        line = (
            f"{label}: {_pct(m['sparsity'])} of weights unchanged (|τ| ≤ {eps:g}){_layer_range(g, label)}; "
            f"update size ‖τ‖/‖θ₀‖ = {_num(m['rel_norm'])}"
        )
        if m["principal_energy"] is not None:
            where = _vs_chance(m["principal_energy_ratio"], "off-principal", "concentrated in principal directions")
            line += (
                f"; {_pct(m['principal_energy'], 2)} of its energy lies in the base's top-{k} singular subspace "
                f"({_num(m['principal_energy_ratio'], '.2f')}× a random update's share: {where})"
            )
        lines.append(line + ".")
    for p in g["model"]["pairs"]:
        relation = _vs_chance(p["overlap_ratio"], "the updates avoid each other", "the updates crowd together")
        lines.append(
            f"{p['a']} vs {p['b']}: supports overlap {_num(p['overlap_ratio'], '.2f')}× chance (Jaccard "
            f"{_num(p['jaccard'])} vs {_num(p['jaccard_chance'])} for independent supports: {relation}); cosine "
            f"{_num(p['cosine'], '.3f')}, {_pct(p['orth_energy_share'])} of the energy orthogonal; signs conflict on "
            f"{_pct(p['sign_conflict'])} of the weights both moved; {_pct(p['unshared_energy_a'])} of {p['a']}'s and "
            f"{_pct(p['unshared_energy_b'])} of {p['b']}'s update energy sits where the other did not move."
        )
    return lines


def _span(items: list[tuple[str, float | None]], fmt: Any) -> str:
    """'a (X) … b (Y)' for the smallest and largest of labelled values, or the one value."""
    known = [(k, v) for k, v in items if v is not None]
    if not known:
        return "n/a"
    (lo_k, lo), (hi_k, hi) = min(known, key=lambda x: x[1]), max(known, key=lambda x: x[1])
    return f"{fmt(lo)} ({lo_k})" if lo_k == hi_k else f"{fmt(lo)} ({lo_k}) to {fmt(hi)} ({hi_k})"


def geometry_summary(g: dict[str, Any]) -> list[str]:
    """At most four short lines over every model and pair (the per-model bullets follow under Details)."""
    models, pairs = g["model"]["models"], g["model"]["pairs"]
    eps = g["settings"]["eps"]
    lines = [f"Unchanged weights (|τ| ≤ {eps:g}): " + _span([(k, m["sparsity"]) for k, m in models.items()], _pct)
             + "; update size ‖τ‖/‖θ₀‖ " + _span([(k, m["rel_norm"]) for k, m in models.items()], _num) + "."]
    if any(m["principal_energy_ratio"] is not None for m in models.values()):
        lines.append(f"Energy in the base's top-{g['settings']['top_k']} subspace vs a random update: "
                     + _span([(k, m["principal_energy_ratio"]) for k, m in models.items()],
                             lambda v: f"{_num(v, '.2f')}×") + " (below 1× = off-principal).")
    if pairs:
        label = [(f"{p['a']}/{p['b']}", p) for p in pairs]
        lines.append("Support overlap vs chance: " + _span([(k, p["overlap_ratio"]) for k, p in label],
                                                          lambda v: f"{_num(v, '.2f')}×")
                     + "; cosine " + _span([(k, p["cosine"]) for k, p in label], lambda v: _num(v, ".3f"))
                     + "; sign conflicts " + _span([(k, p["sign_conflict"]) for k, p in label], _pct) + ".")
    return lines


def geometry_tables(g: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    models = (
        ["model", "sparsity", "density", "‖τ‖", "‖τ‖/‖θ₀‖", "top-k energy", "chance", "ratio"],
        [
            [
                label,
                _pct(m["sparsity"]),
                _pct(m["density"], 2),
                _num(m["norm"]),
                _num(m["rel_norm"]),
                _pct(m["principal_energy"], 2),
                _pct(m["principal_energy_chance"], 2),
                _num(m["principal_energy_ratio"], ".2f"),
            ]
            for label, m in g["model"]["models"].items()
        ],
    )
    tables = [models]
    if g["model"]["pairs"]:
        tables.append(
            (
                [
                    "pair",
                    "Jaccard",
                    "chance",
                    "ratio",
                    "cosine",
                    "sign conflict",
                    "orth. energy",
                    "unshared a",
                    "unshared b",
                ],
                [
                    [
                        f"{p['a']} vs {p['b']}",
                        _num(p["jaccard"]),
                        _num(p["jaccard_chance"]),
                        _num(p["overlap_ratio"], ".2f"),
                        _num(p["cosine"], ".3f"),
                        _pct(p["sign_conflict"]),
                        _pct(p["orth_energy_share"]),
                        _pct(p["unshared_energy_a"]),
                        _pct(p["unshared_energy_b"]),
                    ]
                    for p in g["model"]["pairs"]
                ],
            )
        )
    return tables


def tokens_glance(t: dict[str, Any]) -> list[str]:
    s, b = t["summary"], t["position_buckets"]
    where = ", ".join(f"{name} {_pct(v['share_of_large'], 0)}" for name, v in b.items())
    return [
        f"{_pct(s['near_zero_share'])} of {s['positions']} response positions ({s['responses']} responses) are "
        f"near-zero: JS ≤ {s['near_zero_threshold']:g} bits between the RL and base next-token distributions.",
        f"Mean JS {_num(s['js_mean'])} bits (median {_num(s['js_median'])}, max {_num(s['js_max'])}). The top-decile "
        f"positions (JS ≥ {_num(s['large_threshold'])}) sit at: {where}.",
        f"The RL model's top token is in the base's top-{s['top_k']} at {_pct(s['rl_top_in_base_topk_share'])} of "
        f"positions (same top token: {_pct(s['rl_top_equals_base_top_share'])}).",
        f"Chosen tokens: Δ log p = log p_RL − log p_base has mean {_num(s['dlogp_mean'], '+.3g')} nats; RL made "
        f"{_pct(s['dlogp_positive_share'])} of them more likely and {_pct(s['dlogp_negative_share'])} less likely.",
    ]


def tokens_tables(t: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    buckets = (
        ["bucket", "positions", "mean JS (bits)", "near-zero share", "share of top-decile JS"],
        [
            [name, str(v["positions"]), _num(v["js_mean"]), _pct(v["near_zero_share"]), _pct(v["share_of_large"])]
            for name, v in t["position_buckets"].items()
        ],
    )
    per = (
        ["#", "prompt", "tokens", "finished", "mean JS", "max JS", "near-zero", "Σ Δlog p"],
        [
            [
                str(r["index"]),
                _short(r["prompt"], 50),
                str(r["tokens"]),
                "yes" if r["finished"] else "no",
                _num(r["js_mean"]),
                _num(r["js_max"]),
                _pct(r["near_zero_share"]),
                _num(r["dlogp_sum"], "+.3g"),
            ]
            for r in t["per_response"][:20]
        ],
    )
    return [buckets, per]


def _short(text: str, n: int) -> str:
    text = text.replace("\n", " ").replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------- HTML


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _html_plots(a: dict[str, Any]) -> str:
    return "".join(
        f'<figure><img alt="{html.escape(p["title"])}" src="data:image/png;base64,{_png_b64(a["_dir"], p["file"])}">'
        f"<figcaption><b>{html.escape(p['title'])}.</b> {html.escape(p['caption'])}</figcaption></figure>"
        for p in a.get("plots", [])
    )


def _html_tokens_example(ex: dict[str, Any], thr: float) -> str:
    spans = []
    for tok, js, d in zip(ex["tokens"], ex["js"], ex["dlogp"], strict=True):
        # Colour intensity on a log scale between the near-zero threshold and 1 bit.
        level = 0.0 if js <= thr else min(1.0, math.log10(js / thr) / max(math.log10(1 / thr), 1e-9))
        tip = f"JS {js:.3g} bits, Δlog p {d:+.3g}"
        spans.append(
            f'<span title="{html.escape(tip)}" style="background:rgba(204,51,17,{0.08 + 0.8 * level:.2f})'
            f'">{html.escape(tok)}</span>'
            if js > thr
            else f'<span title="{html.escape(tip)}">{html.escape(tok)}</span>'
        )
    return (
        f"<p class=small>Response {ex['index']} to <code>{html.escape(_short(ex['prompt'], 120))}</code> "
        f"(hover a token for its values; red = JS above {thr:g} bits, darker = larger):</p>"
        f"<div class=tok>{''.join(spans)}</div>"
    )


def render_html(geometry: dict[str, Any] | None, tokens: dict[str, Any] | None, title: str) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class=small>sarmerge {__version__}, rendered {datetime.now(UTC).isoformat(timespec='seconds')}</p>",
    ]
    if geometry:
        g = geometry
        models = "".join(
            f"<li><b>{html.escape(k)}</b>: <code>{html.escape(v)}</code></li>" for k, v in g["models"].items()
        )
        s = g["settings"]
        parts.append(
            f"<h2>Update geometry</h2><p>Base <code>{html.escape(g['base'])}</code>; models:</p><ul>{models}</ul>"
            f"<p class=small>ε = {s['eps']:g}, top-k = {s['top_k']} (SVD {s['svd']}); "
            f"{g['model']['numel']:,} weights in {g['model']['tensors']} tensors. τ = model − base.</p>"
            "<div class=glance><b>Summary</b><ul>"
            + "".join(f"<li>{html.escape(x)}</li>" for x in geometry_summary(g))
            + "</ul></div>"
            + _html_plots(g)
            + "<details><summary>Details: at a glance, per model and pair, and the tables</summary>"
            "<div class=glance><b>At a glance</b><ul>"
            + "".join(f"<li>{html.escape(x)}</li>" for x in geometry_glance(g))
            + "</ul></div>"
            + "".join(_html_table(h, r) for h, r in geometry_tables(g))
            + "</details>"
        )
    if tokens:
        t = tokens
        s = t["settings"]
        parts.append(
            f"<h2>Token-level divergence</h2><p>RL model <code>{html.escape(t['model'])}</code> vs base "
            f"<code>{html.escape(t['base'])}</code> on <code>{html.escape(t['prompts_file'])}</code>; "
            f"{s['decoding']} decoding, up to {s['max_new_tokens']} new tokens, seed {s['seed']}. "
            "JS in bits (0–1), Δ log p in nats.</p><div class=glance><b>At a glance</b><ul>"
            + "".join(f"<li>{html.escape(x)}</li>" for x in tokens_glance(t))
            + "</ul></div>"
            + "".join(_html_table(h, r) for h, r in tokens_tables(t))
            + "".join(_html_tokens_example(ex, t["summary"]["near_zero_threshold"]) for ex in t.get("examples", []))
            + _html_plots(t)
        )
    parts.append("</body></html>\n")
    return "".join(parts)


# ---------------------------------------------------------------- Markdown


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _md_plots(a: dict[str, Any]) -> str:
    return "".join(
        f"\n**{p['title']}.** {p['caption']}\n\n"
        f"![{p['title']}](data:image/png;base64,{_png_b64(a['_dir'], p['file'])})\n"
        for p in a.get("plots", [])
    )


def render_markdown(geometry: dict[str, Any] | None, tokens: dict[str, Any] | None, title: str) -> str:
    out = [f"# {title}\n", f"_sarmerge {__version__}, rendered {datetime.now(UTC).isoformat(timespec='seconds')}_\n"]
    if geometry:
        g, s = geometry, geometry["settings"]
        out.append(
            f"\n## Update geometry\n\nBase `{g['base']}`; models: "
            + ", ".join(f"**{k}** `{v}`" for k, v in g["models"].items())
            + f". ε = {s['eps']:g}, top-k = {s['top_k']} (SVD {s['svd']}); {g['model']['numel']:,} weights in "
            f"{g['model']['tensors']} tensors. τ = model − base.\n\n**Summary**\n\n"
            + "".join(f"- {x}\n" for x in geometry_summary(g))
            + _md_plots(g)
            + "\n### Details\n\n**At a glance**\n\n"
            + "".join(f"- {x}\n" for x in geometry_glance(g))
            + "\n"
            + "\n".join(_md_table(h, r) for h, r in geometry_tables(g))
        )
    if tokens:
        t, s = tokens, tokens["settings"]
        out.append(
            f"\n## Token-level divergence\n\nRL model `{t['model']}` vs base `{t['base']}` on "
            f"`{t['prompts_file']}`; {s['decoding']} decoding, up to {s['max_new_tokens']} new tokens, seed "
            f"{s['seed']}. JS in bits (0–1), Δ log p in nats.\n\n**At a glance**\n\n"
            + "".join(f"- {x}\n" for x in tokens_glance(t))
            + "\n"
            + "\n".join(_md_table(h, r) for h, r in tokens_tables(t))
            + _md_plots(t)
        )
    return "".join(out)


def render_report(
    out: str | Path,
    *,
    geometry: str | Path | dict[str, Any] | None = None,
    tokens: str | Path | dict[str, Any] | None = None,
    title: str = "sarmerge analysis report",
) -> list[Path]:
    """Write `out` as one self-contained page; `.md` → Markdown, `.html` → HTML, a directory → both inside it.

    `geometry` / `tokens`: an analysis directory, or an already-loaded report dict carrying `_dir`.
    """
    g = load_analysis(geometry) if isinstance(geometry, (str, Path)) else geometry
    t = load_analysis(tokens) if isinstance(tokens, (str, Path)) else tokens
    if g is None and t is None:
        raise SarmergeError("nothing to render: give a geometry and/or a tokens analysis directory")
    if g is not None and g.get("kind") != "geometry":
        raise SarmergeError(f"{g.get('_dir')}: is a {g.get('kind')!r} report, not a geometry report")
    if t is not None and t.get("kind") != "tokens":
        raise SarmergeError(f"{t.get('_dir')}: is a {t.get('kind')!r} report, not a tokens report")
    out = Path(out)
    written = []
    if out.suffix.lower() in (".html", ".htm", ".md"):
        targets = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        targets = [out / "report.html", out / "report.md"]
    for f in targets:
        f.parent.mkdir(parents=True, exist_ok=True)
        text = render_markdown(g, t, title) if f.suffix.lower() == ".md" else render_html(g, t, title)
        tmp = f.with_name(f".{f.name}.partial")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(f)
        written.append(f)
    return written
