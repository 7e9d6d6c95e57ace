"""The tiny RLVR family: an SFT'd char-level Qwen2 base and GRPO specialists per verifiable task, in HF layout.

Layout of a built family (every model a bf16 safetensors checkpoint loadable by transformers; load its tokenizer with
`sarmerge.zoo.tiny.load_tokenizer`):

    DIR/family.json          members, config, accuracies before/after on held-out test problems, sparsity, timings
    DIR/base/                the SFT base every specialist starts from
    DIR/math_s0/ math_s1/    GRPO specialists: <task>_s<k>, k = specialist seed
    DIR/code_s0/ code_s1/
    DIR/calib_math.jsonl     calibration prompts/responses per domain ({"prompt", "response"}, for `sarmerge fisher`)
    DIR/calib_code.jsonl

Recipe (why each choice, see the module docs of `train` and `tasks`): the base is SFT'd in fp32 on a mixture of the
tasks (math 3:1, the digit sums being learned more slowly) with imperfect demonstrations: 60 % show the task's typical
slip (a dropped operand, a string not reversed, ...), so the base prefers a plausible wrong rule while giving the right
one real probability. Each specialist is the bf16 base trained with GRPO on its own task (exact-match reward, 60 steps
of 8 problems × 16 samples at temperature 1, plain SGD), kept in fp32 master weights and saved in bf16, where the many
sub-half-ulp updates vanish (RLVR-like sparsity). RL then teaches the specialist to prefer the right rule on its task.

Builds are deterministic for a seed (single CPU thread, deterministic algorithms, explicit generators) and cached under
`~/.cache/sarmerge/zoo/<key>` (`SARMERGE_ZOO_CACHE` overrides the root), the key hashing the code of this package and
the full configuration, so a rebuild happens only when either changes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sarmerge.checkpoint import atomic_output_dir
from sarmerge.errors import SarmergeError
from sarmerge.zoo.tasks import TASKS, get_task
from sarmerge.zoo.tiny import save_checkpoint, tiny_model
from sarmerge.zoo.train import GRPOConfig, SFTConfig, evaluate, grpo, sft, unchanged_fraction

log = logging.getLogger(__name__)

FORMAT = "sarmerge.zoo.tiny/1"
KNOWN_FORMATS = (FORMAT, "sarmerge.zoo.smollm2/1")
_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass
class TinyFamilyConfig:
    """Everything that determines the family's weights (all of it goes into the cache key)."""

    seed: int = 0
    tasks: tuple[str, ...] = ("math", "code")
    seeds_per_task: int = 2  # specialists <task>_s0 … <task>_s{n-1}
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 176
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    test_problems: int = 400  # held-out problems per task for the accuracies in family.json
    calibration_examples: int = 64  # per domain
    threads: int = 1  # torch CPU threads; results are bitwise reproducible for a given thread count

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for t in self.tasks:
            task = get_task(t)
            if task.name.endswith("_nl"):
                raise SarmergeError(f"task {t!r} is phrased for instruction-tuned LLMs; the tiny family takes "
                                    f"{', '.join(n for n in TASKS if not n.endswith('_nl'))}")
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise SarmergeError(f"tasks {list(self.tasks)}: give one or more distinct task names")
        for field, value in [("seeds_per_task", self.seeds_per_task), ("threads", self.threads),
                             ("test_problems", self.test_problems), ("sft.steps", self.sft.steps),
                             ("grpo.steps", self.grpo.steps), ("grpo.group", self.grpo.group)]:
            if value < 1:
                raise SarmergeError(f"tiny family config: {field}={value} must be >= 1")


def code_fingerprint() -> str:
    """sha256 over the source of the zoo package (tasks, training loops, this builder) and the library versions."""
    import transformers

    h = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.glob("*.py")):
        if path.name in ("cli.py", "smollm2.py", "suites.py"):
            continue  # not part of how the tiny family is computed
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(f"torch={torch.__version__};transformers={transformers.__version__}".encode())
    return h.hexdigest()


def cache_key(cfg: TinyFamilyConfig) -> str:
    payload = json.dumps({"format": FORMAT, "code": code_fingerprint(), "config": cfg.as_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def default_cache_root() -> Path:
    return Path(os.environ.get("SARMERGE_ZOO_CACHE") or Path.home() / ".cache" / "sarmerge" / "zoo")


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    # warn_only: a CUDA run without CUBLAS_WORKSPACE_CONFIG would otherwise refuse to start
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _bf16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}


def _round_to_bf16(model: torch.nn.Module) -> None:
    """Make the fp32 weights exactly the values the bf16 checkpoint stores (what evaluation and children see)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))


def _save_bf16(model: torch.nn.Module, tok, path: Path) -> None:
    """Save a bf16 copy: casting the model itself would also round its rotary-frequency buffer, which a checkpoint
    loaded from disk recomputes exactly — and evaluation would then disagree with the saved model."""
    save_checkpoint(copy.deepcopy(model), tok, path, dtype=torch.bfloat16)


def _specialist_seed(family_seed: int, task: str, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{family_seed}:{task}:{k}".encode()).digest()[:4], "big")


def _accuracies(model, tok, test_sets: dict[str, Sequence]) -> dict[str, float]:
    return {name: round(evaluate(model, tok, get_task(name), problems), 4) for name, problems in test_sets.items()}


def _build(out: Path, cfg: TinyFamilyConfig, key: str, progress: bool) -> dict[str, Any]:
    t_start, c_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    tasks = [get_task(t) for t in cfg.tasks]
    test_sets = {t.name: t.generate(cfg.test_problems, seed=cfg.seed, split="test") for t in tasks}

    model, tok = tiny_model(cfg.seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                            intermediate=cfg.intermediate)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    losses = sft(model, tok, tasks, cfg.sft, seed=cfg.seed, progress=progress)
    timings["sft"] = time.perf_counter() - t0
    _round_to_bf16(model)
    model.eval()
    _save_bf16(model, tok, out / "base")
    base_state = _bf16_state(model)
    base_acc = _accuracies(model, tok, test_sets)
    log.info("base: %s accuracy on held-out test problems", base_acc)

    members = []
    for task in tasks:
        for k in range(cfg.seeds_per_task):
            name = f"{task.name}_s{k}"
            seed = _specialist_seed(cfg.seed, task.name, k)
            child = copy.deepcopy(model)
            t0 = time.perf_counter()
            history = grpo(child, tok, task, cfg.grpo, seed=seed, reference=model, progress=progress)
            timings[f"grpo_{name}"] = time.perf_counter() - t0
            _round_to_bf16(child)
            child_state = _bf16_state(child)
            unchanged = unchanged_fraction(base_state, child_state)
            _save_bf16(child, tok, out / name)
            acc = _accuracies(child, tok, test_sets)
            members.append({
                "name": name, "path": name, "domain": task.domain, "task": task.name, "seed": k, "grpo_seed": seed,
                "base": "base", "accuracy_before": base_acc, "accuracy_after": acc,
                "gain": round(acc[task.name] - base_acc[task.name], 4),
                "unchanged_fraction": round(unchanged, 4),
                "reward_first_last": [round(history[0]["reward"], 4), round(history[-1]["reward"], 4)],
                "mean_reward": round(sum(h["reward"] for h in history) / len(history), 4),
            })
            log.info("%s: own-task accuracy %.3f -> %.3f, %.1f%% of weights unchanged", name, base_acc[task.name],
                     acc[task.name], 100 * unchanged)

    calibration = {}
    for task in tasks:
        path = out / f"calib_{task.domain}.jsonl"
        problems = task.generate(cfg.calibration_examples, seed=cfg.seed + 10_000, split="train")
        with path.open("w") as f:
            for p in problems:
                f.write(json.dumps({"prompt": p.prompt, "response": p.answer}) + "\n")
        calibration[task.domain] = path.name

    timings["total"] = time.perf_counter() - t_start
    timings["cpu_total"] = time.process_time() - c_start
    family = {
        "format": FORMAT,
        "seed": cfg.seed,
        "key": key,  # computed before the build: the code it hashes is the code that ran
        "model": {"architecture": "Qwen2ForCausalLM", "parameters": n_params, "dtype": "bfloat16",
                  "tokenizer": "char-level (load with sarmerge.zoo.tiny.load_tokenizer)"},
        "tasks": {t.name: {"domain": t.domain, "description": t.description, "test_problems": cfg.test_problems,
                           "test_seed": cfg.seed} for t in tasks},
        "calibration": calibration,
        "base": {"path": "base", "accuracy": base_acc, "sft_loss_first_last": [round(losses[0], 4),
                                                                             round(losses[-1], 4)]},
        "members": members,
        "config": cfg.as_dict(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": cfg.threads, "torch": torch.__version__},
    }
    (out / "family.json").write_text(json.dumps(family, indent=2) + "\n")
    return family


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise builders of one cache entry across processes (a second waits, then finds it built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_family(path: str | Path) -> dict[str, Any]:
    """family.json of a built family, with `root` set to its directory."""
    path = Path(path)
    file = path / "family.json"
    try:
        family = json.loads(file.read_text())
    except FileNotFoundError:
        raise SarmergeError(f"{file}: no family.json (not a built zoo family)") from None
    except json.JSONDecodeError as e:
        raise SarmergeError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if family.get("format") not in KNOWN_FORMATS:
        raise SarmergeError(f"{file}: format {family.get('format')!r}, expected one of {', '.join(KNOWN_FORMATS)}")
    family["root"] = str(path)
    return family


def build_tiny_family(out: str | Path | None = None, seed: int = 0, *, cache_dir: str | Path | bool | None = None,
                      overwrite: bool = False, progress: bool = True, config: TinyFamilyConfig | None = None,
                      **overrides: Any) -> dict[str, Any]:
    """Build (or fetch from the cache) the tiny RLVR family and return its family.json (plus `root`).

    out: where to put the family (atomically); None → use the cache entry itself, read-only by convention.
    cache_dir: cache root (None → `default_cache_root()`); False → no cache, build straight into `out`.
    config / overrides: a `TinyFamilyConfig`, or its fields by keyword (e.g. `seeds_per_task=1`,
      `sft=SFTConfig(steps=50)`); `seed` always wins.
    """
    cfg = dataclasses.replace(config or TinyFamilyConfig(), **overrides, seed=seed)
    cfg.validate()
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SarmergeError(f"{out}: output already exists (pass --overwrite to replace it)")
    if cache_dir is False:
        if out is None:
            raise SarmergeError("build_tiny_family: give `out` when the cache is off")
        with _torch_settings(cfg.threads), atomic_output_dir(out, overwrite=overwrite) as tmp:
            _build(tmp, cfg, cache_key(cfg), progress)
        return load_family(out)

    root = Path(cache_dir) if cache_dir not in (None, True) else default_cache_root()
    entry = root / cache_key(cfg)
    with _lock(root / f".{entry.name}.lock"):
        if (entry / "family.json").exists():
            log.info("tiny family: cache hit %s", entry)
        else:
            log.info("tiny family: building into cache %s", entry)
            with _torch_settings(cfg.threads), atomic_output_dir(entry, overwrite=True) as tmp:
                _build(tmp, cfg, entry.name, progress)
    if out is None:
        return load_family(entry)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        shutil.copytree(entry, tmp, dirs_exist_ok=True)
    return load_family(out)
