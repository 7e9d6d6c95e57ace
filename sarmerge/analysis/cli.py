"""`sarmerge analyze geometry|tokens|report`: update geometry, token-level divergence, and one combined page."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="geometry and token-level analysis reports (JSON, PNG plots, HTML/Markdown)",
        description=__doc__,
    )
    kinds = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    kinds.required = True

    g = kinds.add_parser(
        "geometry",
        help="sparsity, overlap, orthogonality and spectral placement of task vectors",
        description="Stream base and models tensor by tensor and report, per tensor / layer / whole model: update "
        "sparsity at tolerance ε, pairwise support overlap (Jaccard and its ratio to chance), cosine, sign conflicts "
        "on the overlap, orthogonal energy share, energy inside the base's top-k singular subspace, and norms. "
        "Definitions: sarmerge/analysis/geometry.py and the README.",
    )
    g.add_argument("--base", required=True, type=Path, help="base checkpoint directory (θ₀)")
    g.add_argument("--models", required=True, nargs="+", type=Path, help="one or more checkpoints sharing the base")
    g.add_argument("--out", required=True, type=Path, help="output directory (created atomically)")
    g.add_argument("--names", nargs="+", help="display names for --models (default: directory names)")
    g.add_argument("--eps", type=float, default=1e-5, help="|τ| ≤ eps counts as unchanged (default 1e-5)")
    g.add_argument(
        "--top-k",
        type=int,
        default=16,
        help="rank of the base's principal subspace for the spectral metric; 0 = skip it (default 16)",
    )
    g.add_argument(
        "--svd",
        choices=["auto", "exact", "lowrank"],
        default="auto",
        help="exact SVD, randomized torch.svd_lowrank, or auto (exact when the short side ≤ 512)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    g.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (runs code!)")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=_geometry)

    t = kinds.add_parser(
        "tokens",
        help="per-position JS divergence between RL and base along RL-generated responses",
        description="Generate responses with the RL model, then compare its next-token distributions with the "
        "base's at every response position: Jensen-Shannon divergence (bits), share of near-zero positions, where "
        "the large ones sit, whether the RL top token is in the base top-k, and Δ log p of the chosen tokens.",
    )
    t.add_argument("--base", required=True, type=Path, help="base checkpoint directory")
    t.add_argument("--model", required=True, type=Path, help="RL checkpoint directory (generates the responses)")
    t.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help='.jsonl with {"prompt": ...} per line, or a text file with one prompt per line',
    )
    t.add_argument("--out", required=True, type=Path, help="output directory (created atomically)")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    t.add_argument("--sample", action="store_true", help="sample responses (default: greedy)")
    t.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    t.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --sample)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--near-zero", type=float, default=1e-3, help="JS ≤ this (bits) counts as near-zero (default 1e-3)")
    t.add_argument("--top-k", type=int, default=5, help="is the RL top token in the base top-k? (default 5)")
    t.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    t.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    t.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    t.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (runs code!)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_tokens)

    r = kinds.add_parser(
        "report",
        help="render geometry and/or tokens results as one self-contained page",
        description="Combine analysis directories into one page with the plots embedded: OUT "
        "ending in .html or .md writes that file; otherwise OUT is a directory that gets both.",
    )
    r.add_argument("--geometry", type=Path, help="output directory of `analyze geometry`")
    r.add_argument("--tokens", type=Path, help="output directory of `analyze tokens`")
    r.add_argument("--out", required=True, type=Path, help="report.html, report.md, or a directory")
    r.add_argument("--title", default="sarmerge analysis report")
    r.set_defaults(func=_report)


def _geometry(args: argparse.Namespace) -> int:
    from sarmerge.analysis.geometry import geometry_report

    rep = geometry_report(
        args.base,
        args.models,
        args.out,
        overwrite=args.overwrite,
        names=args.names,
        eps=args.eps,
        top_k=args.top_k,
        svd=args.svd,
        threads=args.threads,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress,
    )
    for label, m in rep["model"]["models"].items():
        print(f"{label}: sparsity {m['sparsity']:.1%}, ‖τ‖/‖θ₀‖ {m['rel_norm'] or 0:.3g}")
    for p in rep["model"]["pairs"]:
        ratio = "–" if p["overlap_ratio"] is None else f"{p['overlap_ratio']:.2f}"
        cos = "–" if p["cosine"] is None else f"{p['cosine']:.3f}"
        print(f"{p['a']} vs {p['b']}: overlap {ratio}× chance, cosine {cos}")
    print(f"report: {args.out / 'report.html'}")
    return 0


def _tokens(args: argparse.Namespace) -> int:
    from sarmerge.analysis.tokens import token_report

    rep = token_report(
        args.base,
        args.model,
        args.prompts,
        args.out,
        overwrite=args.overwrite,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        near_zero=args.near_zero,
        top_k=args.top_k,
        max_prompts=args.max_prompts,
        chat_template=not args.no_chat_template,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress,
    )
    s = rep["summary"]
    print(
        f"{s['responses']} responses, {s['positions']} positions: {s['near_zero_share']:.1%} near-zero "
        f"(JS ≤ {s['near_zero_threshold']:g} bits), mean JS {s['js_mean']:.3g} bits, RL top token in base "
        f"top-{s['top_k']}: {s['rl_top_in_base_topk_share']:.1%}"
    )
    print(f"report: {args.out / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from sarmerge.analysis.report import render_report

    for f in render_report(args.out, geometry=args.geometry, tokens=args.tokens, title=args.title):
        print(f"wrote {f}")
    return 0
