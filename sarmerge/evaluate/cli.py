"""`sarmerge evaluate`: score a checkpoint on math and code benchmarks, offline.

Writes OUT/samples.jsonl (one record per sample: id, prompt, completion, extracted answer, verdict) and
OUT/summary.json (accuracy / pass@1, unbiased pass@k, 95 % intervals, tokens, seconds, seeds, backend, sandbox).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sarmerge.errors import SarmergeError


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
    p.add_argument("--limit", type=int, help="first N problems of each suite (procedural suites: generate N)")
    p.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, help="default: each suite's own budget")
    p.add_argument("--backend", default="auto", help="auto (vllm on a GPU machine when installed, else hf) | hf | vllm")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generation batch (hf)")
    p.add_argument("--seed", type=int, default=0, help="sampling, procedural data and bootstrap seed")
    p.add_argument("--device", help="hf device: cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--no-chat-template", action="store_true", help="prompt with bare text even if a template exists")
    p.add_argument("--workers", type=int, help="parallel sandbox processes (default min(4, CPUs))")
    p.add_argument("--sandbox-timeout", type=float, default=15.0, help="wall seconds per code sample (default 15)")
    p.add_argument("--sandbox-cpu", type=int, default=10, help="CPU seconds per code sample (default 10)")
    p.add_argument("--sandbox-memory", default="1GiB", help="address space per code sample (default 1GiB)")
    p.add_argument("--sandbox-scratch", default="64MiB", help="scratch tmpfs size per code sample (default 64MiB)")
    p.add_argument("--allow-unisolated", action="store_true",
                   help="run code/reasoning-gym suites even where the sandbox cannot isolate (rlimits only): "
                        "model output can then reach the network, your files and your environment")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-suites", action="store_true", help="list the available suites and exit")
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
    import torch

    from sarmerge.checkpoint import parse_size
    from sarmerge.evaluate.benchmarks import resolve_suites
    from sarmerge.evaluate.runner import evaluate, parse_data_args
    from sarmerge.evaluate.sandbox import SandboxLimits

    if args.threads:
        torch.set_num_threads(args.threads)
    data = parse_data_args(args.data, resolve_suites(args.suite))
    limits = SandboxLimits(cpu_seconds=args.sandbox_cpu, wall_seconds=args.sandbox_timeout,
                           memory_bytes=parse_size(args.sandbox_memory),
                           scratch_bytes=parse_size(args.sandbox_scratch))
    summary = evaluate(args.model, args.suite, out=args.out, limit=args.limit, n=args.n, temperature=args.temperature,
                       top_p=args.top_p, backend=args.backend, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, seed=args.seed, data=data, device=args.device,
                       dtype=args.dtype, use_chat_template=not args.no_chat_template, sandbox_limits=limits,
                       workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite,
                       allow_unisolated=args.allow_unisolated)
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
