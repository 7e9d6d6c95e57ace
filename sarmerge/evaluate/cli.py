"""`sarmerge evaluate`: score a checkpoint on math and code benchmarks, offline.

Writes OUT/samples.jsonl (one record per sample: id, prompt, completion, extracted answer, verdict) and
OUT/summary.json (accuracy / pass@1, unbiased pass@k, 95 % intervals, tokens, seconds, seeds, backend, sandbox).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sarmerge.errors import SarmergeError
from sarmerge.options import EvaluateOptions


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on math/code benchmarks", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint directory (Hugging Face layout, safetensors)")
    p.add_argument("--suite", default="math,code",
                   help="comma-separated suites or groups: math, code, gsm8k, champ, humaneval, math500, aime, mbpp, "
                        "reasoning_gym:<task> (default math,code; --list-suites shows all)")
    p.add_argument("--out", type=Path, help="output directory (created atomically)")
    p.add_argument("--data", action="append", default=[], metavar="SUITE=PATH",
                   help="your own data file for a suite, in its official format (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-suites", action="store_true", help="list the available suites and exit")
    EvaluateOptions.add_flags(p.add_argument_group("evaluation options (EvaluateOptions; params.yaml `evaluate:`)"))
    p.set_defaults(func=_cli)


def _list_suites() -> int:
    from sarmerge.evaluate.benchmarks import FAMILIES, GROUPS, SUITES

    for name, suite in SUITES.items():
        print(f"{name:<22} {suite.kind:<6} {'(needs --data) ' if suite.needs_data else ''}{suite.source}")
    for prefix, factory in FAMILIES.items():
        print(f"{prefix + ':<task>':<22} {'':<6} {(factory.__doc__ or '').strip().splitlines()[0]}")
    for group, members in GROUPS.items():
        print(f"{group:<22} group  = {', '.join(members)}")
    return 0


def _cli(args: argparse.Namespace) -> int:
    if args.list_suites:
        return _list_suites()
    if args.model is None or args.out is None:
        raise SarmergeError("--model and --out are required")
    from sarmerge.evaluate.benchmarks import resolve_suites
    from sarmerge.evaluate.runner import evaluate, parse_data_args

    data = parse_data_args(args.data, resolve_suites(args.suite))
    summary = evaluate(args.model, args.suite, EvaluateOptions.from_args(args), out=args.out, data=data,
                       progress=not args.no_progress, overwrite=args.overwrite)
    print(f"{'suite':<24} {'problems':>8} {'pass@1':>7}  95% interval    tokens  seconds")
    for name, s in summary["suites"].items():
        lo, hi = s["ci95"]
        secs = s["seconds"]["generate"] + s["seconds"]["score"]
        print(f"{name:<24} {s['problems']:>8} {s['accuracy']:>7.3f}  [{lo:.3f}, {hi:.3f}]  {s['tokens_generated']:>8} "
              f"{secs:>8.1f}")
    if summary["sandbox"] is not None and not summary["sandbox"]["isolated"]:
        print(f"warning: model output ran UNISOLATED (sandbox mode {summary['sandbox']['mode']}, allowed by "
              "--allow-unisolated; see summary.json 'sandbox')")
    print(f"wrote {args.out}/samples.jsonl and {args.out}/summary.json")
    return 0
