"""The merge engine: preflight every input, then stream tensor by tensor through the method into sharded output.

Three stages overlap: a loader thread reads the next tensor group, the main thread merges the current one, and a
writer thread streams the previous one to disk. Input files are hashed (for the manifest) in the background.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from sarmerge import __version__
from sarmerge.checkpoint import DTYPE_CODES, SAFETENSORS_DTYPES, Checkpoint, ShardedWriter, all_finite, torch_dtype
from sarmerge.config import MergeConfig, load_config
from sarmerge.errors import SarmergeError
from sarmerge.fisher_store import FisherStore
from sarmerge.layout import (
    CONFIG_FILE,
    FLOAT_CODES,
    MERGE_DTYPES,
    MERGE_MANIFEST,
    MODEL_CARD,
    atomic_output_dir,
    copy_aux_files,
    parse_size,
    sha256_file,
)
from sarmerge.methods import TensorGroup

log = logging.getLogger(__name__)
TORCH_DTYPES = {name: torch_dtype(name) for name in MERGE_DTYPES}


@dataclass
class Inputs:
    base: Checkpoint | None
    models: list[Checkpoint]
    fishers: list[FisherStore | None]
    names: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Checkpoint:
        return self.base or self.models[0]

    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models

    def close(self) -> None:
        for c in self.all():
            c.close()
        for f in self.fishers:
            if f:
                f.close()


def _tokenizer_vocab(ckpt: Checkpoint) -> int | None:
    f = ckpt.path / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        tok = json.loads(f.read_text())
        vocab = tok.get("model", {}).get("vocab", {})
        return len(vocab) + len({a["id"] for a in tok.get("added_tokens", [])} - set(vocab.values()))
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise SarmergeError(f"{f}: unreadable tokenizer: {e}") from e


def open_checkpoints(base: str | Path | None, models: Sequence[str | Path], *, allow_pickle: bool = False) -> Inputs:
    """Open base + models and cross-check them: config.json present, tensor names, shapes and dtypes, architecture
    keys, tokenizer vocabulary. One clear SarmergeError on the first problem (and every file closed again)."""
    inputs = Inputs(Checkpoint(base, allow_pickle=allow_pickle) if base else None, [], [])
    try:
        inputs.models = [Checkpoint(m, allow_pickle=allow_pickle) for m in models]
        _check_compatible(inputs)
    except BaseException:
        inputs.close()
        raise
    return inputs


def _check_compatible(inputs: Inputs) -> None:
    for ckpt in inputs.all():
        if ckpt.path.is_dir() and not (ckpt.path / CONFIG_FILE).is_file():
            raise SarmergeError(
                f"{ckpt.path}: not a model directory (no {CONFIG_FILE}): its architecture and vocabulary cannot be "
                "checked against the other inputs"
            )
    ref = inputs.reference
    for other in inputs.all():
        if other is ref:
            continue
        missing = [n for n in ref.names if n not in other.tensors]
        extra = [n for n in other.names if n not in ref.tensors]
        if missing or extra:
            what = f"lacks tensor {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
            more = len(missing) + len(extra) - 1
            raise SarmergeError(
                f"{other.path}: {what} compared with {ref.path}" + (f" (and {more} more differences)" if more else "")
            )
        for n in ref.names:
            a, b = ref.tensors[n], other.tensors[n]
            if a.shape != b.shape:
                raise SarmergeError(
                    f"{b.file}: tensor {n!r} has shape {list(b.shape)} but {a.file} has {list(a.shape)}"
                )
            if a.dtype != b.dtype:
                raise SarmergeError(f"{b.file}: tensor {n!r} has dtype {b.dtype} but {a.file} has {a.dtype}")
        for key in ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers"):
            va, vb = ref.config.get(key), other.config.get(key)
            if va is not None and vb is not None and va != vb:
                raise SarmergeError(f"{other.path / CONFIG_FILE}: {key} = {vb!r} but {ref.path} has {va!r}")
        va, vb = _tokenizer_vocab(ref), _tokenizer_vocab(other)
        if va is not None and vb is not None and va != vb:
            raise SarmergeError(f"{other.path / 'tokenizer.json'}: vocabulary has {vb} tokens but {ref.path} has {va}")
    inputs.names = list(ref.names)


def preflight(cfg: MergeConfig, *, allow_pickle: bool = False) -> Inputs:
    """Open and cross-check every input of a merge (checkpoints, then Fisher stores) before any merging."""
    inputs = open_checkpoints(cfg.base_model, [e.model for e in cfg.models], allow_pickle=allow_pickle)
    try:
        ref = inputs.reference
        for e in cfg.models:
            store = FisherStore(e.fisher) if e.fisher else None
            inputs.fishers.append(store)
            if store is not None:
                if cfg.spec.fisher == "dense" and store.layout != "dense":
                    raise SarmergeError(
                        f"{store.path}: stores Fisher on the update support only; method {cfg.method!r} needs dense "
                        "Fisher (recompute without --support-of)"
                    )
                for n in inputs.names:
                    if ref.tensors[n].dtype in FLOAT_CODES:
                        store.check_matches(n, ref.tensors[n].shape)
    except BaseException:
        inputs.close()
        raise
    return inputs


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor RNG seed: reproducible regardless of processing order, threads or device."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


class Item(NamedTuple):
    name: str
    rows: tuple[int, int] | None  # a row range; None = the whole tensor
    stats_pass: int | None = None  # index of a multi-pass method's statistics pass (sums, writes nothing); None = merge


class _Merger:
    def __init__(self, cfg: MergeConfig, inputs: Inputs, device: torch.device, chunk_elements: int) -> None:
        self.cfg, self.inputs, self.device = cfg, inputs, device
        self.compute = TORCH_DTYPES[cfg.dtype]
        self.chunk_elements = chunk_elements
        self.params = {n: cfg.params_for(n) for n in inputs.names}
        self.fisher_offsets: list[int] = [0] * len(inputs.fishers)
        self.stats: dict[str, dict[str, torch.Tensor]] = {}  # multi-pass methods: sums over the chunks seen so far

    def items(self, name: str) -> list[Item]:
        """Split a tensor into row chunks when the method allows it, so memory is bounded by the chunk."""
        info = self.inputs.reference.tensors[name]
        mode = self.cfg.spec.chunking_for(self.params[name])
        rows = info.shape[0] if info.shape else 0
        if (
            info.dtype not in FLOAT_CODES
            or mode == "tensor"
            or len(info.shape) < (2 if mode == "row" else 1)
            or info.numel <= self.chunk_elements
            # the streamed exact top-k (TIES) keys on fp32 bit patterns; fp64 compute takes whole tensors
            or (mode == "multi_pass" and self.compute == torch.float64)
        ):
            return [Item(name, None)]
        step = max(1, self.chunk_elements // max(1, info.numel // rows))
        chunks = [(r, min(r + step, rows)) for r in range(0, rows, step)]
        passes = len(self.cfg.spec.stats) if mode == "multi_pass" else 0
        return [Item(name, c, stats_pass=p) for p in range(passes) for c in chunks] + [Item(name, c) for c in chunks]

    def load(self, item: Item) -> dict:
        """Read one item from every input (runs on the loader thread)."""
        name, rows, _ = item
        ins = self.inputs
        return {
            "base": ins.base.read(name, rows) if ins.base else None,
            "models": [m.read(name, rows) for m in ins.models],
        }

    def merge(self, item: Item, raw: dict) -> torch.Tensor | None:
        """The merged tensor of one item; None for a statistics pass (its sums are kept for the later passes)."""
        name, rows, stats_pass = item
        ref_info = self.inputs.reference.tensors[name]
        out_dtype = TORCH_DTYPES[self.cfg.out_dtype] if self.cfg.out_dtype else SAFETENSORS_DTYPES[ref_info.dtype]
        if ref_info.dtype not in FLOAT_CODES:
            # Integer/bool buffers are not weights: carry them over from the reference unchanged.
            return raw["base"] if raw["base"] is not None else raw["models"][0]
        base = raw["base"].to(self.device, self.compute) if raw["base"] is not None else None
        models = [t.to(self.device, self.compute) for t in raw["models"]]
        group = TensorGroup(
            name=name,
            base=base,
            models=models,
            weights=[e.weight for e in self.cfg.models],
            densities=[e.density for e in self.cfg.models],
            generator=torch.Generator().manual_seed(tensor_seed(self.cfg.seed, name)),
        )
        if stats_pass is not None:
            raw.clear()
            seen = self.stats.setdefault(name, {})
            group.stats = seen  # complete sums of the earlier passes
            for k, v in self.cfg.spec.stats[stats_pass](group, self.params[name]).items():
                seen[k] = seen[k] + v if k in seen else v
            return None
        if rows is not None and name in self.stats:
            group.stats = self.stats[name]
            if rows[1] == ref_info.shape[0]:
                del self.stats[name]
        if any(self.inputs.fishers):
            group.fishers = self._fishers(name, rows, raw)
        raw.clear()  # the stored-dtype copies are no longer needed: free them before the method allocates
        merged = self.cfg.spec.fn(group, self.params[name])
        if not all_finite(merged):
            raise SarmergeError(f"tensor {name!r}: method {self.cfg.method!r} produced NaN/Inf (check its parameters)")
        return merged.to("cpu", out_dtype)

    def _fishers(self, name: str, rows: tuple[int, int] | None, raw: dict) -> list[torch.Tensor | None]:
        # The support mask is defined on the fp32 task vector, whatever the compute dtype.
        b32 = raw["base"].to(self.device, torch.float32) if raw["base"] is not None else None
        first = rows is None or rows[0] == 0
        out: list[torch.Tensor | None] = []
        for i, (store, m) in enumerate(zip(self.inputs.fishers, raw["models"], strict=True)):
            if store is None:
                out.append(None)
                continue
            if first:
                self.fisher_offsets[i] = 0
            tau = m.to(self.device, torch.float32) - b32 if b32 is not None else None
            dense, used = store.dense_rows(name, tau, rows, self.fisher_offsets[i])
            self.fisher_offsets[i] += used
            last = rows is None or rows[1] == self.inputs.reference.tensors[name].shape[0]
            if store.layout == "support" and last and self.fisher_offsets[i] != store.ckpt.info(name).numel:
                raise SarmergeError(
                    f"{store.path}: Fisher tensor {name!r} has {store.ckpt.info(name).numel} support values but the "
                    f"model moved at {self.fisher_offsets[i]} positions (ε={store.epsilon}); it was computed against "
                    "a different base"
                )
            out.append(dense.to(self.compute))
        return out


def run_merge(
    cfg: MergeConfig,
    out: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    out_shard_size: str | int = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    chunk_elements: int = 1 << 22,
) -> dict:
    """Merge per `cfg` into `out` atomically; returns the manifest."""
    t0 = time.perf_counter()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SarmergeError(f"--device {device}: CUDA is not available on this machine")
    if threads:
        torch.set_num_threads(threads)
    shard_bytes = parse_size(out_shard_size)
    out = Path(out)
    inputs = preflight(cfg, allow_pickle=allow_pickle)
    t_pre = time.perf_counter() - t0
    try:
        ref = inputs.reference
        out_code = DTYPE_CODES[TORCH_DTYPES[cfg.out_dtype]] if cfg.out_dtype else None
        plan = [
            (n, t.shape, out_code if out_code and t.dtype in FLOAT_CODES else t.dtype)
            for n, t in ((n, ref.tensors[n]) for n in inputs.names)
        ]
        merger = _Merger(cfg, inputs, torch.device(device), chunk_elements)
        items = [item for n in inputs.names for item in merger.items(n)]
        to_hash = [(role, c) for role, c in (("base", inputs.base),) if c] + [("model", m) for m in inputs.models]
        with (
            atomic_output_dir(out, overwrite=overwrite) as tmp,
            ThreadPoolExecutor(2) as hasher,
            ThreadPoolExecutor(1) as loader,
            ThreadPoolExecutor(1) as writer_pool,
        ):
            hashes = {str(f): hasher.submit(sha256_file, f) for _, c in to_hash for f in c.files}
            for store in inputs.fishers:
                if store:
                    hashes.update({str(f): hasher.submit(sha256_file, f) for f in store.ckpt.files})
            writer = ShardedWriter(tmp, plan, shard_bytes, {"sarmerge.method": cfg.method})
            t_merge = time.perf_counter()
            bar = tqdm(
                total=sum(ref.tensors[n].nbytes for n in inputs.names),
                unit="B",
                unit_scale=True,
                desc=f"merge {cfg.method}",
                disable=not progress,
            )
            pending: Future | None = None
            next_load = loader.submit(merger.load, items[0]) if items else None
            for i, item in enumerate(items):
                raw = next_load.result()
                next_load = loader.submit(merger.load, items[i + 1]) if i + 1 < len(items) else None
                merged = merger.merge(item, raw)
                del raw
                if merged is None:
                    continue
                if pending is not None:
                    pending.result()
                pending = writer_pool.submit(writer.write, item.name, merged)
                bar.update(merged.numel() * ref.tensors[item.name].nbytes // max(1, ref.tensors[item.name].numel))
            if pending is not None:
                pending.result()
            writer.close()
            bar.close()
            t_merge = time.perf_counter() - t_merge
            tok_src = Path(cfg.tokenizer) if cfg.tokenizer else ref.path
            aux = copy_aux_files(tok_src, tmp, out_dtype=cfg.out_dtype) if tok_src.is_dir() else []
            th = time.perf_counter()
            digests = {f: fut.result() for f, fut in hashes.items()}
            t_hash_wait = time.perf_counter() - th
            manifest = {
                "sarmerge_version": __version__,
                "git_revision": _git_revision(),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "method": cfg.method,
                "config": cfg.resolved(),
                "seed": cfg.seed,
                "inputs": [
                    {
                        "role": role,
                        "path": str(c.path),
                        "files": [
                            {"name": f.name, "sha256": digests[str(f)], "bytes": f.stat().st_size} for f in c.files
                        ],
                    }
                    for role, c in to_hash
                ],
                "fisher": [
                    {
                        "model": e.model,
                        "path": str(s.path),
                        "layout": s.layout,
                        "metadata": {k: v for k, v in s.metadata.items() if k != "format"},
                        "files": [{"name": f.name, "sha256": digests[str(f)]} for f in s.ckpt.files],
                    }
                    for e, s in zip(cfg.models, inputs.fishers, strict=True)
                    if s
                ],
                "output": {
                    "files": writer.shard_names,
                    "total_bytes": writer.total_size,
                    "tensors": len(inputs.names),
                    "copied": aux,
                },
                "runtime": {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()},
                "timings_s": {
                    "preflight": round(t_pre, 3),
                    "merge": round(t_merge, 3),
                    "hash_wait": round(t_hash_wait, 3),
                    "total": round(time.perf_counter() - t0, 3),
                },
            }
            (tmp / MERGE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / MODEL_CARD).write_text(model_card(manifest))
    finally:
        inputs.close()
    log.info("merged %d tensors with %s into %s in %.1fs", len(inputs.names), cfg.method, out, time.perf_counter() - t0)
    return manifest


def model_card(m: dict, *, evaluation: dict[str, dict] | None = None, base_models: list[str] | None = None,
               model_name: str | None = None) -> str:
    """README.md of a merged model: Hub-ready front matter (`base_model` = the merged models and the base,
    `base_model_relation: merge`, `library_name`, `tags`, and `model-index` results when `evaluation` is given:
    suite → {"accuracy", "ci95", "problems"}), then the merge in prose. `base_models` replaces the lineage names (the
    pipeline passes registry URIs instead of workspace paths); the pipeline rewrites the card once scores exist."""
    import yaml

    cfg = m["config"]
    lineage = base_models or [*(e["model"] for e in cfg["models"]), *([cfg["base_model"]] if cfg["base_model"] else [])]
    front: dict = {"base_model": [str(x) for x in dict.fromkeys(lineage)], "base_model_relation": "merge",
                   "library_name": "transformers", "tags": ["merge", "sarmerge", str(m["method"])]}
    if evaluation:
        front["model-index"] = [{"name": model_name or f"sarmerge-{m['method']}-merge", "results": [
            {"task": {"type": "text-generation", "name": "Text Generation"},
             "dataset": {"name": suite, "type": suite},
             "metrics": [{"type": "accuracy", "value": round(float(r["accuracy"]), 4),
                          "name": "accuracy" + (f" (95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}, "
                                                f"{r.get('problems', '?')} problems)" if r.get("ci95") else ""),
                          "verified": False}]}
            for suite, r in sorted(evaluation.items())]}]
    rows = "\n".join(
        f"| {e['model']} | {e['weight']} | {e['density'] if e['density'] is not None else ''} | {e['fisher'] or ''} |"
        for e in cfg["models"]
    )
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in cfg["parameters"].items()) or "| (none) | |"
    front_matter = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    return f"""---
{front_matter}---
# Merged model ({m["method"]})

Produced by [sarmerge](https://pypi.org/project/sarmerge/) {m["sarmerge_version"]} (revision `{m["git_revision"]}`)
on {m["created_at"]}. Base model: `{cfg["base_model"]}`. Seed: {m["seed"]}.

| model | weight | density | fisher |
|---|---|---|---|
{rows}

| parameter | value |
|---|---|
{params}

Per-tensor overrides: {len(cfg["overrides"])}. Compute dtype `{cfg["dtype"]}`, output dtype
`{cfg["out_dtype"] or "as input"}`. Every input file's sha256, the full resolved config and timings are in
`merge_manifest.json`.
"""


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints as a YAML config says", description=__doc__)
    p.add_argument("config", type=Path, help="merge YAML (method, base_model, models, parameters, ...)")
    p.add_argument("out", type=Path, nargs="?", help="output directory (created atomically; not with --check)")
    p.add_argument("--check", action="store_true",
                   help="run the preflight alone (config, every input's tensors, shapes, dtypes, config.json, "
                        "tokenizer vocabulary, Fisher stores) and merge nothing")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-shard-size", default="5GB", help="max bytes per output shard, e.g. 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (runs code!)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)


def check(cfg: MergeConfig, *, allow_pickle: bool = False) -> str:
    """The preflight alone: raises the merge's own SarmergeError, else returns a one-line summary."""
    inputs = preflight(cfg, allow_pickle=allow_pickle)
    try:
        ref = inputs.reference
        floats = [n for n in inputs.names if ref.tensors[n].dtype in FLOAT_CODES]
        params = sum(ref.tensors[n].numel for n in floats)
        fishers = sum(1 for f in inputs.fishers if f)
        megabytes = sum(ref.tensors[n].nbytes for n in inputs.names) / 1e6
        base = f"base {ref.path.name} + " if inputs.base else ""
        return (f"ok: {cfg.method} of {base}{len(inputs.models)} model(s): {len(inputs.names)} tensors "
                f"({len(floats)} merged, {params:,} parameters, {megabytes:.1f} MB per model), "
                f"{fishers} Fisher store(s); nothing written")
    finally:
        inputs.close()


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.check:
        if args.out is not None:
            raise SarmergeError(f"--check merges nothing; drop the output directory {str(args.out)!r}")
        print(check(cfg, allow_pickle=args.allow_pickle))
        return 0
    if args.out is None:
        raise SarmergeError("the output directory OUT is required (or pass --check to run the preflight alone)")
    m = run_merge(
        cfg,
        args.out,
        device=args.device,
        threads=args.threads,
        out_shard_size=args.out_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress,
    )
    print(
        f"merged {m['output']['tensors']} tensors with {m['method']} into {args.out} "
        f"({m['output']['total_bytes'] / 1e6:.1f} MB, {m['timings_s']['total']:.1f}s)"
    )
    return 0
