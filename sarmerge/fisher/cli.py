"""`sarmerge fisher`: the command line of `run_fisher`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sarmerge.fisher.memory import _fmt_bytes
from sarmerge.fisher.run import run_fisher
from sarmerge.options import FisherOptions


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fisher", help="diagonal Fisher information of a causal LM on calibration prompts",
        description=sys.modules["sarmerge.fisher"].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (HF layout, safetensors)")
    p.add_argument("--data", required=True,
                   help="calibration JSONL ({'prompt': ..., 'response'?: ...} per line), or `math` / `code` for the "
                        "shipped GSM8K / HumanEval sets")
    p.add_argument("--out", required=True, type=Path, help="output Fisher store directory (created atomically)")
    p.add_argument("--support-of", type=Path, default=None, metavar="BASE",
                   help="store Fisher only where the model differs from BASE by more than --epsilon (for sar)")
    p.add_argument("--resume", action="store_true", help="continue from the partial sums of an interrupted run")
    p.add_argument("--state-dir", type=Path, default=None, help="where partial sums live (default OUT.fisher-state)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    FisherOptions.add_flags(p.add_argument_group("estimation options (FisherOptions; params.yaml `fisher:`)"))
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    m = run_fisher(args.model, args.data, args.out, FisherOptions.from_args(args), support_of=args.support_of,
                   resume=args.resume, state_dir=args.state_dir, overwrite=args.overwrite,
                   progress=not args.no_progress)
    size = f"{_fmt_bytes(m['stored_bytes'])}"
    if m["layout"] == "support":
        size += f" on the update support = {100 * m['size_fraction']:.1f}% of the dense {_fmt_bytes(m['dense_bytes'])}"
    print(f"fisher ({m['mode']}, {m['examples']} examples, {m['tokens']} response tokens, per-example "
          f"{m['per_example']}) written to {args.out}: {size}; {m['throughput']['examples_per_s']:.2f} examples/s")
    return 0
