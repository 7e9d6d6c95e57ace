"""`sarmerge fisher`: the command line of `run_fisher`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sarmerge.fisher.memory import _fmt_bytes
from sarmerge.fisher.run import TORCH_DTYPES, run_fisher


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
    p.add_argument("--mode", choices=["sampled", "empirical"], default="sampled",
                   help="sampled: responses drawn from the model (true Fisher, default); empirical: the references")
    p.add_argument("--examples", type=int, default=None,
                   help="number of examples (default: every line; sampled mode cycles the prompts beyond that)")
    p.add_argument("--support-of", type=Path, default=None, metavar="BASE",
                   help="store Fisher only where the model differs from BASE by more than --epsilon (for sar)")
    p.add_argument("--epsilon", type=float, default=1e-5, help="support threshold on |θ − θ_base| (default 1e-5)")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *TORCH_DTYPES],
                   help="weights' compute dtype (default: bfloat16 on CUDA, float32 on CPU); sums are always fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256, help="sampled response length limit (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-example", choices=["auto", "hooks", "vmap", "loop"], default="auto",
                   help="how per-example gradients are computed (default auto: hooks when verified, else loop)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass (less memory, per-example loop)")
    p.add_argument("--checkpoint-every", type=int, default=64, metavar="K",
                   help="save partial sums every K examples for --resume (0 = never; default 64)")
    p.add_argument("--resume", action="store_true", help="continue from the partial sums of an interrupted run")
    p.add_argument("--state-dir", type=Path, default=None, help="where partial sums live (default OUT.fisher-state)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--shard-size", default="5GB", help="max bytes per output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    m = run_fisher(
        args.model, args.data, args.out, mode=args.mode, examples=args.examples, support_of=args.support_of,
        epsilon=args.epsilon, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, per_example=args.per_example,
        gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
        resume=args.resume, state_dir=args.state_dir, overwrite=args.overwrite, threads=args.threads,
        shard_size=args.shard_size, progress=not args.no_progress,
    )
    size = f"{_fmt_bytes(m['stored_bytes'])}"
    if m["layout"] == "support":
        size += f" on the update support = {100 * m['size_fraction']:.1f}% of the dense {_fmt_bytes(m['dense_bytes'])}"
    print(f"fisher ({m['mode']}, {m['examples']} examples, {m['tokens']} response tokens, per-example "
          f"{m['per_example']}) written to {args.out}: {size}; {m['throughput']['examples_per_s']:.2f} examples/s")
    return 0
