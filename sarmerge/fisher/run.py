"""`run_fisher`: checks, tokenization, model loading, resumable estimation and the atomic Fisher store."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sarmerge import __version__
from sarmerge.checkpoint import Checkpoint, torch_dtype
from sarmerge.errors import SarmergeError
from sarmerge.fisher.data import build_examples, context_length, read_calibration, resolve_data
from sarmerge.fisher.estimate import FisherSums, estimate_fisher
from sarmerge.fisher.memory import _fmt_bytes, estimate_memory
from sarmerge.fisher.per_example import _params
from sarmerge.fisher_store import FisherStore, save_fisher
from sarmerge.hf import checkpoint_tokenizer, end_of_response_ids, load_causal_lm
from sarmerge.layout import FISHER_MANIFEST, FLOAT_CODES, MODEL_DTYPES, atomic_output_dir, files_sha256, sha256_file
from sarmerge.options import FisherOptions

log = logging.getLogger("sarmerge.fisher")

META_PREFIX = "sarmerge.fisher."
TORCH_DTYPES = {name: torch_dtype(name) for name in MODEL_DTYPES}
STATE_FILE = "state.json"


def model_sha256(files: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """sha256 of the weights: the file's own digest for one file; for shards, of their `sha256sum`-style listing."""
    return files_sha256(files)


def _default_dtype(device: torch.device) -> str:
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def stop_tokens(ckpt: Checkpoint, tokenizer: Any) -> list[int]:
    """End-of-response ids by the one rule of `sarmerge.hf.end_of_response_ids`; the first one ends empirical
    references."""
    return end_of_response_ids(ckpt.path, tokenizer)


def checkpoint_names(model: nn.Module, ckpt: Checkpoint) -> dict[str, str | None]:
    """Checkpoint float tensor name → canonical parameter name (None for a float buffer, whose Fisher is zero)."""
    canonical = {id(p): n for n, p in _params(model).items()}
    every = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    mapping: dict[str, str | None] = {}
    prefix = getattr(model, "base_model_prefix", "")
    for name, info in ckpt.tensors.items():
        if info.dtype not in FLOAT_CODES:
            continue
        # Some checkpoints store the base model's names without its prefix (`h.0...` for `transformer.h.0...`).
        p = every.get(name, every.get(f"{prefix}.{name}") if prefix else None)
        if p is None:
            if name in buffers or f"{prefix}.{name}" in buffers:
                mapping[name] = None
                continue
            raise SarmergeError(f"{info.file}: tensor {name!r} is not a parameter of the loaded "
                                f"{type(model).__name__} (its Fisher cannot be computed)")
        if tuple(p.shape) != info.shape:
            raise SarmergeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)} but the loaded model's "
                                f"parameter has {list(p.shape)}")
        mapping[name] = canonical[id(p)]
    return mapping


def state_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.fisher-state"


def _save_state(state_dir: Path, sums: FisherSums, fingerprint: dict[str, Any]) -> None:
    """Write partial sums, then commit them by atomically replacing state.json (the only commit point)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sub = f"sums-{sums.examples:09d}"
    target = state_dir / sub
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    save_fisher(target, sums.sums, {"sarmerge.fisher.partial": "true"})
    record = {"fingerprint": fingerprint, "examples": sums.examples, "response_tokens": sums.response_tokens,
              "total_tokens": sums.total_tokens, "sums": sub}
    tmp = state_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, state_dir / STATE_FILE)
    for old in state_dir.glob("sums-*"):
        if old.name != sub:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(state_dir: Path, fingerprint: dict[str, Any], model: nn.Module) -> FisherSums | None:
    f = state_dir / STATE_FILE
    if not f.exists():
        return None
    try:
        record = json.loads(f.read_text())
        saved = record["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SarmergeError(f"{f}: unreadable resume state ({e}); delete {state_dir} to start over") from e
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise SarmergeError(f"{f}: cannot resume: {key} was {saved.get(key)!r}, now {value!r} "
                                f"(rerun with the same settings, or delete {state_dir} to start over)")
    store = FisherStore(state_dir / record["sums"])
    try:
        sums = {}
        for name, p in _params(model).items():
            if name not in store.ckpt.tensors:
                raise SarmergeError(f"{store.path}: resume state lacks tensor {name!r}")
            sums[name] = store.ckpt.read(name).to(p.device, torch.float32)
    finally:
        store.close()
    return FisherSums(sums, record["examples"], record["response_tokens"], record["total_tokens"])


def run_fisher(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    options: FisherOptions | None = None,
    *,
    support_of: str | Path | None = None,
    resume: bool = False,
    state_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[FisherSums], None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Compute a checkpoint's diagonal Fisher on a calibration JSONL and write a Fisher store to `out` atomically.

    The estimation knobs are `FisherOptions` (an object, keyword arguments, or both); `support_of` stores the Fisher
    only where the model moved from that base. Returns the manifest (also written to `out/fisher_manifest.json`).
    """
    t0 = time.perf_counter()
    opts = FisherOptions.resolve(options, settings, where="run_fisher")
    mode, examples, epsilon, dtype = opts.mode, opts.examples, opts.epsilon, opts.dtype
    batch_size, max_new_tokens, seed, per_example = opts.batch_size, opts.max_new_tokens, opts.seed, opts.per_example
    gradient_checkpointing, checkpoint_every = opts.gradient_checkpointing, opts.checkpoint_every
    dev = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SarmergeError(f"--device {opts.device}: CUDA is not available on this machine")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SarmergeError(f"{out}: output already exists (pass --overwrite to replace it)")
    state_path = Path(state_dir) if state_dir else state_dir_for(out)

    data_path = resolve_data(data)
    records = read_calibration(data_path, mode)
    ckpt = Checkpoint(model_dir)
    base = Checkpoint(support_of) if support_of is not None else None
    try:
        if base is not None:
            for name, info in ckpt.tensors.items():
                other = base.tensors.get(name)
                if info.dtype in FLOAT_CODES and (other is None or other.shape != info.shape):
                    what = "lacks it" if other is None else f"has shape {list(other.shape)}"
                    raise SarmergeError(f"{base.path}: --support-of base {what} for tensor {name!r} "
                                        f"({list(info.shape)} in {info.file})")
        with ThreadPoolExecutor(1) as hasher:
            model_hash = hasher.submit(model_sha256, ckpt.files)
            data_hash = sha256_file(data_path)
            tokenizer = checkpoint_tokenizer(ckpt.path)
            stops = stop_tokens(ckpt, tokenizer)
            eos = stops[0] if stops else None
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
            # Every record is checked against the context before the model is loaded.
            todo = build_examples(records, tokenizer, mode=mode, n_examples=examples,
                                  context=context_length(ckpt.config), max_new_tokens=max_new_tokens, eos_id=eos,
                                  source=str(data_path))
            model = _load_model(ckpt.path, dev, dtype)
            names = checkpoint_names(model, ckpt)
            model_digest, file_digests = model_hash.result()

        compute_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        fingerprint = {"model_sha256": model_digest, "data_sha256": data_hash, "mode": mode, "examples": len(todo),
                       "seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                       "dtype": compute_dtype}
        start = None
        if resume:
            start = _load_state(state_path, fingerprint, model)
            if start is None:
                log.warning("--resume: no saved state in %s; starting from the beginning", state_path)
            else:
                log.info("resuming from %d/%d examples saved in %s", start.examples, len(todo), state_path)
        elif (state_path / STATE_FILE).exists():
            log.warning("discarding the partial state in %s (pass --resume to continue from it)", state_path)
            shutil.rmtree(state_path, ignore_errors=True)

        longest = max(len(e.prompt_ids) + max(len(e.response_ids), e.response_limit) for e in todo)
        shortest_prompt = min(len(e.prompt_ids) for e in todo)
        backend_guess = "loop" if gradient_checkpointing else ("hooks" if per_example == "auto" else per_example)
        memory = estimate_memory(model, batch_size=batch_size, seq_len=longest, keep=longest - shortest_prompt + 1,
                                 backend=backend_guess, gradient_checkpointing=gradient_checkpointing)
        total = sum(memory.values())
        log.info("memory estimate on %s: %s ≈ %s", dev, ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in memory.items()),
                 _fmt_bytes(total))
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            if total > free:
                log.warning("estimated %s exceeds the %s free on %s: lower --batch-size, or use "
                            "--gradient-checkpointing", _fmt_bytes(total), _fmt_bytes(free), dev)
        log.info("fisher %s on %d examples from %s (batch %d, %s, seed %d); partial sums every %d examples in %s",
                 mode, len(todo), data_path, batch_size, compute_dtype, seed, checkpoint_every, state_path)

        resumed_from = start.examples if start is not None else 0
        t_compute = time.perf_counter()
        saved = [resumed_from]

        def save_state(partial: FisherSums) -> None:
            _save_state(state_path, partial, fingerprint)
            saved[0] = partial.examples

        try:
            result = estimate_fisher(
                model, todo, mode=mode, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                eos_ids=set(stops), pad_id=pad_id, per_example=per_example,
                gradient_checkpointing=gradient_checkpointing, start=start, checkpoint_every=checkpoint_every,
                on_checkpoint=save_state if checkpoint_every else None, on_batch=on_batch, progress=progress,
            )
        except KeyboardInterrupt:
            if saved[0]:
                log.warning("interrupted; partial sums for %d/%d examples are in %s: rerun with --resume to "
                            "continue", saved[0], len(todo), state_path)
            raise
        t_compute = time.perf_counter() - t_compute
        fisher = result.fisher()
        by_ckpt = {
            name: fisher[canon].cpu() if canon is not None
            else torch.zeros(ckpt.tensors[name].shape, dtype=torch.float32)
            for name, canon in names.items()
        }
        taus = None
        if base is not None:
            taus = {name: ckpt.read(name).to(torch.float32) - base.read(name).to(torch.float32) for name in by_ckpt}
        dense_bytes = sum(t.numel() * 4 for t in by_ckpt.values())
        metadata = {
            "mode": mode, "examples": result.examples, "tokens": result.response_tokens,
            "total_tokens": result.total_tokens, "data_sha256": data_hash, "data_file": str(data_path),
            "model_sha256": model_digest, "model": str(ckpt.path), "seed": seed, "dtype": compute_dtype,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens if mode == "sampled" else "",
            "per_example": result.backend, "device": str(dev), "sarmerge_version": __version__,
        }
        if base is not None:
            metadata["support_of"] = str(base.path)
            metadata["support_of_sha256"] = model_sha256(base.files)[0]
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            stored = save_fisher(tmp, by_ckpt, {META_PREFIX + k: str(v) for k, v in metadata.items()},
                                 support_taus=taus, epsilon=epsilon, shard_size=opts.shard_size)
            manifest = {
                **metadata,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "layout": "support" if taus is not None else "dense",
                "epsilon": epsilon,
                "model_files": file_digests,
                "stored_bytes": stored,
                "dense_bytes": dense_bytes,
                "size_fraction": stored / dense_bytes if dense_bytes else 1.0,
                "resumed_from": resumed_from,
                "truncated_responses": sum(e.truncated for e in todo),
                "timings_s": {"compute": round(t_compute, 3), "total": round(time.perf_counter() - t0, 3)},
                "throughput": {"examples_per_s": round((result.examples - resumed_from) / max(t_compute, 1e-9), 3)},
            }
            (tmp / FISHER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(state_path, ignore_errors=True)
    finally:
        ckpt.close()
        if base is not None:
            base.close()
    return manifest


def _load_model(path: Path, device: torch.device, dtype: str) -> nn.Module:
    return load_causal_lm(path, dtype=TORCH_DTYPES[_default_dtype(device) if dtype == "auto" else dtype], device=device)
