"""One-shot GPU check (issue #15 item 5): the library's GPU paths measured on whatever accelerator is lent.

    bash bench/gpu_check.sh              # on the GPU machine: ≤ 8 minutes on one H100/H200
    bash bench/gpu_check.sh --dry        # anywhere: tiny shapes on the CPU (CI runs this)

Three checks, each against its baseline in the same process:
1. Fisher on a SmolLM2-135M-shaped Llama (random weights; built from its config, nothing downloaded), bf16 on CUDA:
   examples/s and tokens/s of `sarmerge.fisher.estimate_fisher` (per-example backends `hooks` and `loop`) against a
   bare forward+backward loop on the same batches, and model FLOP utilisation against `--peak-tflops`.
2. Merge of a Qwen2.5-1.5B-shaped family (base + 3 sparse bf16 children, 2 GB shards) with `sarmerge merge
   --device cuda` against the same merge on the CPU: wall time, and whether the outputs' sha256 agree.
3. Batched greedy generation (transformers `generate`, left padding, KV cache) at batch 16 against one prompt at a
   time on the same prompts: tokens/s, and whether the token sequences are identical.

Prints one table (and writes `gpu_check.json` to `$OUT` or `--out`); exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_135M = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}
TINY_LLAMA = {**SMOLLM2_135M, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def llama(cfg: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(device, dtype).eval()


# -- 1. Fisher --------------------------------------------------------------------------------------------------------
def check_fisher(device: torch.device, dry: bool, peak_tflops: float) -> dict[str, Any]:
    from sarmerge.fisher import Example, estimate_fisher, examples_batch, processing_order, response_logprob

    cfg = TINY_LLAMA if dry else SMOLLM2_135M
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = llama(cfg, device, dtype)
    n, prompt_len, response_len, batch_size = (8, 16, 16, 4) if dry else (128, 256, 256, 16)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        p = int(torch.randint(prompt_len // 2, prompt_len + 1, (1,), generator=gen))
        r = int(torch.randint(response_len // 2, response_len + 1, (1,), generator=gen))
        ids = torch.randint(1, cfg["vocab_size"], (p + r,), generator=gen).tolist()
        examples.append(Example(i, i + 1, ids[:p], ids[p:]))
    ordered = processing_order(examples)
    batches = [examples_batch(ordered[i: i + batch_size], device, 0) for i in range(0, n, batch_size)]
    tokens = sum(b.total_tokens for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)

    def bare() -> float:
        for p in model.parameters():
            p.requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            for p in model.parameters():
                p.grad = None
            response_logprob(model, b).sum().backward()
        sync(device)
        return time.perf_counter() - t0

    def fisher(per_example: str) -> tuple[float, str]:
        sync(device)
        t0 = time.perf_counter()
        res = estimate_fisher(model, examples, mode="empirical", batch_size=batch_size, per_example=per_example)
        sync(device)
        return time.perf_counter() - t0, res.backend

    bare()  # warm-up: kernels, allocator
    fisher("auto")
    t_bare = min(bare() for _ in range(2))
    rows: dict[str, Any] = {"bare_loop": {"s": t_bare, "examples_per_s": n / t_bare, "tokens_per_s": tokens / t_bare}}
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    lm_head = cfg["vocab_size"] * cfg["hidden_size"]
    mean_len = padded / n
    flops = padded * (6 * (non_embedding + lm_head) + 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * mean_len)
    for per_example in ("hooks", "loop"):
        t, backend = min((fisher(per_example) for _ in range(2)), key=lambda x: x[0])
        rows[f"fisher_{per_example}"] = {"s": t, "backend": backend, "examples_per_s": n / t,
                                         "tokens_per_s": tokens / t, "vs_bare": t_bare / t}
    for row in rows.values():
        row["mfu"] = flops / row["s"] / (peak_tflops * 1e12) if device.type == "cuda" else None
    return {"model": "tiny-llama" if dry else "smollm2-135m-shaped", "dtype": str(dtype), "examples": n,
            "tokens": tokens, "batch_size": batch_size, "rows": rows}


# -- 2. Merge ---------------------------------------------------------------------------------------------------------
def _sha(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def check_merge(device: torch.device, dry: bool, work: Path) -> dict[str, Any]:
    import yaml

    from sarmerge.synthetic import write_family

    shape = "qwen2-tiny" if dry else "qwen2.5-1.5b"
    t0 = time.perf_counter()
    members = write_family(work / f"family-{shape}", shape=shape)
    written = time.perf_counter() - t0
    rows = {}
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.2}),
                           ("sar", {"sensitivity": "delta2"})):
        cfg = work / f"{method}.yaml"
        cfg.write_text(yaml.safe_dump({"method": method, "base_model": str(members[0]),
                                       "models": [{"model": str(m)} for m in members[1:]], "parameters": params}))
        result = {}
        for dev in ("cpu", device.type) if device.type == "cuda" else ("cpu",):
            out = work / f"out-{method}-{dev}"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sarmerge", "merge", str(cfg), str(out), "--overwrite",
                            "--no-progress", "--device", dev], check=True, cwd=ROOT)
            result[dev] = {"s": time.perf_counter() - t, "sha256": _sha(out)}
        if "cuda" in result:
            result["speedup"] = result["cpu"]["s"] / result["cuda"]["s"]
            result["same_bytes"] = result["cpu"]["sha256"] == result["cuda"]["sha256"]
        rows[method] = result
    gib = sum(f.stat().st_size for f in members[0].glob("*.safetensors")) / 2**30
    return {"shape": shape, "model_gib": gib, "family_write_s": written, "rows": rows}


# -- 3. Generation ----------------------------------------------------------------------------------------------------
def check_generation(device: torch.device, dry: bool) -> dict[str, Any]:
    cfg = TINY_LLAMA if dry else SMOLLM2_135M
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = llama(cfg, device, dtype)
    batch, new_tokens = (4, 8) if dry else (16, 128)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cfg["vocab_size"], (int(torch.randint(16, 64, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(batch)]

    def run(group: list[list[int]]) -> list[list[int]]:
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, width:].tolist()

    run(prompts[:2])  # warm-up
    sync(device)
    t = time.perf_counter()
    singles = [run([p])[0] for p in prompts]
    sync(device)
    t_single = time.perf_counter() - t
    t = time.perf_counter()
    batched = run(prompts)
    sync(device)
    t_batch = time.perf_counter() - t
    same = sum(a == b for a, b in zip(singles, batched, strict=True))
    total = batch * new_tokens
    return {"batch": batch, "new_tokens": new_tokens, "single_tokens_per_s": total / t_single,
            "batched_tokens_per_s": total / t_batch, "speedup": t_single / t_batch, "identical": same,
            "of": batch}


def table(res: dict[str, Any]) -> str:
    lines = ["| check | result |", "|---|---|"]
    f = res.get("fisher")
    if isinstance(f, dict) and "rows" in f:
        for name, row in f["rows"].items():
            mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
            vs = f", {row['vs_bare']:.2f}× bare" if "vs_bare" in row else ""
            lines.append(f"| fisher {f['model']} {name} | {row['examples_per_s']:.1f} ex/s, "
                         f"{row['tokens_per_s']:.0f} tok/s{vs}{mfu} |")
    m = res.get("merge")
    if isinstance(m, dict) and "rows" in m:
        for method, row in m["rows"].items():
            cuda = (f"; cuda {row['cuda']['s']:.1f} s ({row['speedup']:.2f}× cpu), same bytes: {row['same_bytes']}"
                    if "cuda" in row else "")
            lines.append(f"| merge {m['shape']} ({m['model_gib']:.2f} GiB/model) {method} | "
                         f"cpu {row['cpu']['s']:.1f} s{cuda} |")
    g = res.get("generation")
    if isinstance(g, dict) and "speedup" in g:
        lines.append(f"| generate batch {g['batch']} vs 1 | {g['batched_tokens_per_s']:.0f} vs "
                     f"{g['single_tokens_per_s']:.0f} tok/s ({g['speedup']:.1f}×), "
                     f"identical {g['identical']}/{g['of']} |")
    for name, err in res.get("errors", {}).items():
        lines.append(f"| {name} | FAILED: {err.splitlines()[-1][:200]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--only", nargs="*", default=["fisher", "merge", "generation"])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    if not args.dry and device.type != "cuda":
        print("gpu_check: no CUDA device here (use --dry for the CPU smoke run)", file=sys.stderr)
        return 2
    from bench._report import machine

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else machine(),
                           "python": platform.python_version(), "torch": torch.__version__, "dry": args.dry,
                           "errors": {}}
    with tempfile.TemporaryDirectory(prefix="sarmerge-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        checks = {"fisher": lambda: check_fisher(device, args.dry, args.peak_tflops),
                  "merge": lambda: check_merge(device, args.dry, work),
                  "generation": lambda: check_generation(device, args.dry)}
        for name in args.only:
            t = time.perf_counter()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                res[name] = checks[name]()
            except Exception:
                res["errors"][name] = traceback.format_exc()
                print(res["errors"][name], file=sys.stderr)
            print(f"gpu_check: {name} done in {time.perf_counter() - t:.1f} s", flush=True)
    gen = res.get("generation")
    if isinstance(gen, dict) and gen.get("identical") != gen.get("of"):
        differ = gen["of"] - gen["identical"]
        res["errors"]["generation"] = f"batched outputs differ from one-by-one on {differ} prompts"
    print(f"\nDevice: {res['device']}; Python {res['python']}, torch {res['torch']}\n")
    print(table(res))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
