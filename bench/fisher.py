"""Fisher benchmark (SPEC §10): examples/s of the `sarmerge fisher` estimator against a bare forward+backward loop.

    .venv/bin/python -m bench.fisher                         # CPU: tiny and small Qwen2 on the shipped GSM8K set
    .venv/bin/python -m bench.fisher --configs tiny --runs 3 # quick
    .venv/bin/python -m bench.fisher --smollm2-shaped --device cuda   # GPU: tokens/s and MFU, SmolLM2-135M shape

Both sides process the same model, the same batches (the shipped calibration set, tokenized with the model's char
tokenizer, right-padded, in file order) and the same loss (log p of the reference responses, empirical mode). The
bare loop is what a trainer does: one forward and one backward of the batch's summed log-likelihood, parameter
gradients in `.grad`. The estimator is `sarmerge.fisher.estimate_fisher`, the loop that `sarmerge fisher` runs after
loading the model (model loading, hashing and writing are reported separately as a whole CLI run). Each run times
both sides back to back (order alternating), so the ratio of one run compares like with like on a shared machine;
the table gives medians over runs. Results go to bench/results/fisher.json and to the `fisher` section of
BENCHMARKS.md.

`--smollm2-shaped` builds a Llama model with SmolLM2-135M's config (random weights; no download) and reports tokens/s
and model FLOP utilisation, 6·N·tokens + attention (12·L·d·T per token) against `--peak-tflops` (H100 SXM dense
bf16: 989). It runs on CPU too, but MFU is only meaningful on the GPU it names.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._report import machine, write_section
from sarmerge.fisher import (
    SHIPPED_DATA,
    Example,
    build_examples,
    estimate_fisher,
    examples_batch,
    processing_order,
    read_calibration,
    response_logprob,
)

ROOT = Path(__file__).resolve().parent.parent


CONFIGS = {
    # name: tiny_config keyword arguments (char tokenizer, so tokens ≈ characters)
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 176, "max_positions": 2048},
    "small": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 704, "max_positions": 2048},
}
SMOLLM2_135M = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}


def bare_loop(model: torch.nn.Module, batches: list) -> tuple[float, float]:
    """(wall, CPU) seconds for one plain forward+backward per batch (what training does), gradients in .grad."""
    for p in model.parameters():
        p.requires_grad_(True)
    sync(model)
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in batches:
        for p in model.parameters():
            p.grad = None
        response_logprob(model, batch).sum().backward()
    sync(model)
    return time.perf_counter() - t0, time.process_time() - c0


def fisher_loop(model: torch.nn.Module, examples: list[Example], batch_size: int,
                per_example: str) -> tuple[float, float, str]:
    """(wall, CPU) seconds of the estimator over all examples, and the per-example backend it used."""
    sync(model)
    t0, c0 = time.perf_counter(), time.process_time()
    result = estimate_fisher(model, examples, mode="empirical", batch_size=batch_size, per_example=per_example)
    sync(model)
    return time.perf_counter() - t0, time.process_time() - c0, result.backend


def sync(model: torch.nn.Module) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def cpu_benchmark(name: str, args: argparse.Namespace) -> dict:
    from sarmerge.zoo.tiny import save_checkpoint, tiny_model

    model, tok = tiny_model(0, **CONFIGS[name])
    model.eval()
    records = read_calibration(SHIPPED_DATA[args.data], "empirical")
    examples = build_examples(records, tok, mode="empirical", n_examples=args.examples, context=2048,
                              max_new_tokens=1, eos_id=tok.eos_token_id, source=args.data)
    ordered = processing_order(examples)  # the batches the estimator forms
    batches = [examples_batch(ordered[i : i + args.batch_size], "cpu", tok.pad_token_id)
               for i in range(0, len(ordered), args.batch_size)]
    n = len(examples)
    tokens = sum(b.total_tokens for b in batches)
    backends = ["auto", *args.also]
    rows: dict[str, list[float]] = {"bare": [], **{b: [] for b in backends}}
    ratios: dict[str, list[float]] = {b: [] for b in backends}
    cpu_ratios: dict[str, list[float]] = {b: [] for b in backends}
    chosen = ""
    bare_loop(model, batches[:1])  # warm-up (allocator, lazy init)
    estimate_fisher(model, examples[: args.batch_size], mode="empirical", batch_size=args.batch_size)
    for run in range(args.runs):
        for backend in backends:
            if run % 2:  # alternate the order so drift on a shared machine does not favour one side
                t_f, c_f, used = fisher_loop(model, examples, args.batch_size, backend)
                t_b, c_b = bare_loop(model, batches)
            else:
                t_b, c_b = bare_loop(model, batches)
                t_f, c_f, used = fisher_loop(model, examples, args.batch_size, backend)
            chosen = used if backend == "auto" else chosen
            rows["bare"].append(n / t_b)
            rows[backend].append(n / t_f)
            ratios[backend].append(t_b / t_f)
            cpu_ratios[backend].append(c_b / c_f)
            print(f"[{name}] run {run + 1}: bare {n / t_b:.1f} ex/s, fisher {backend}({used}) {n / t_f:.1f} ex/s, "
                  f"ratio {t_b / t_f:.3f} (CPU time {c_b / c_f:.3f})", flush=True)
    cli = None
    if args.cli_runs:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = save_checkpoint(model, tok, Path(tmp) / "model")
            walls = []
            for i in range(args.cli_runs):
                cmd = [sys.executable, "-m", "sarmerge", "fisher", "--model", str(ckpt), "--data", args.data,
                       "--out", str(Path(tmp) / f"f{i}"), "--mode", "empirical", "--batch-size", str(args.batch_size),
                       "--threads", str(args.threads), "--no-progress"]
                if args.examples:
                    cmd += ["--examples", str(args.examples)]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                walls.append(time.perf_counter() - t0)
            cli = statistics.median(walls)
    params = sum(p.numel() for p in model.parameters())
    return {
        "config": name, "params": params, "examples": n, "tokens": tokens, "batch_size": args.batch_size,
        "auto_backend": chosen,
        "examples_per_s": {k: statistics.median(v) for k, v in rows.items()},
        "tokens_per_s": {k: statistics.median(v) * tokens / n for k, v in rows.items()},
        "ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_runs": ratios,
        "cpu_time_ratio": {k: statistics.median(v) for k, v in cpu_ratios.items()},
        "cli_wall_s": cli,
    }


def smollm2_benchmark(args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(args.examples or 64):
        p_len = int(torch.randint(args.prompt_len // 2, args.prompt_len + 1, (1,), generator=gen))
        r_len = int(torch.randint(args.response_len // 2, args.response_len + 1, (1,), generator=gen))
        ids = torch.randint(1, SMOLLM2_135M["vocab_size"], (p_len + r_len,), generator=gen).tolist()
        examples.append(Example(i, i + 1, ids[:p_len], ids[p_len:]))
    ordered = processing_order(examples)
    batches = [examples_batch(ordered[i : i + args.batch_size], device, 0)
               for i in range(0, len(ordered), args.batch_size)]
    n = len(examples)
    tokens = sum(b.total_tokens for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)
    cfg = SMOLLM2_135M
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    lm_head = cfg["vocab_size"] * cfg["hidden_size"]
    # Model FLOPs per processed (padded) position: 6·(non-embedding + LM head) + attention 12·L·d·T/2 (causal).
    mean_len = padded / sum(b.size for b in batches)
    flops = padded * (6 * (non_embedding + lm_head) + 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * mean_len)
    bare_loop(model, batches[:1])
    estimate_fisher(model, examples[: args.batch_size], mode="empirical", batch_size=args.batch_size)
    out: dict[str, list[float]] = {"bare": [], "fisher": []}
    backend = ""
    for _ in range(args.runs):
        t_b, _ = bare_loop(model, batches)
        t_f, _, backend = fisher_loop(model, examples, args.batch_size, "auto")
        out["bare"].append(t_b)
        out["fisher"].append(t_f)
        print(f"[smollm2-135m-shaped] bare {n / t_b:.1f} ex/s, fisher {n / t_f:.1f} ex/s ({backend})", flush=True)
    med = {k: statistics.median(v) for k, v in out.items()}
    peak = args.peak_tflops * 1e12
    return {
        "config": "smollm2-135m-shaped", "device": str(device), "dtype": str(dtype), "examples": n, "tokens": tokens,
        "batch_size": args.batch_size, "backend": backend,
        "examples_per_s": {k: n / v for k, v in med.items()},
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "ratio": med["bare"] / med["fisher"],
        "mfu": {k: flops / v / peak for k, v in med.items()} if device.type == "cuda" else None,
        "peak_tflops": args.peak_tflops,
    }


def report(results: list[dict], args: argparse.Namespace, where: str | None = None) -> str:
    lines = [
        f"Machine: {where or machine()}; torch {torch.__version__}, {args.threads} torch thread(s). The machine is",
        "shared, so absolute rates drift between runs; each ratio is measured within one run (same model, batches,",
        "loss, back to back), and the CPU-time ratio is the one least disturbed by other load.",
        f"Data: shipped `{args.data}` calibration set (GSM8K references, empirical mode), batch {args.batch_size}, "
        f"median of {args.runs} runs.",
        "",
        "| model | params | examples | tokens | bare fwd+bwd ex/s | `sarmerge fisher` ex/s | ratio (target ≥ 0.8) "
        "| ratio by CPU time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["config"] == "smollm2-135m-shaped":
            continue
        lines.append(
            f"| {r['config']} Qwen2 (char vocab) | {r['params'] / 1e6:.2f} M | {r['examples']} | {r['tokens']} | "
            f"{r['examples_per_s']['bare']:.1f} | {r['examples_per_s']['auto']:.1f} ({r['auto_backend']}) | "
            f"**{r['ratio']['auto']:.2f}×** | {r['cpu_time_ratio']['auto']:.2f}× |"
        )
        for other in args.also:
            lines.append(f"| … per-example `{other}` | | | | | {r['examples_per_s'][other]:.1f} | "
                         f"{r['ratio'][other]:.2f}× | {r['cpu_time_ratio'][other]:.2f}× |")
    lines += [
        "",
        "`sarmerge fisher` uses `--per-example auto`, which picked the backend in brackets. Its rate includes the",
        "start-up check that hooks agree with the per-example loop. `loop` pays no padding (one sequence at a time),",
        "which on a single CPU thread can offset its per-call overhead; on a GPU it leaves the device mostly idle.",
    ]
    cli = [r for r in results if r.get("cli_wall_s")]
    if cli:
        lines.append("")
        lines.append("Whole `sarmerge fisher` process (Python start, model load, hashing, writing): " + ", ".join(
            f"{r['config']} {r['cli_wall_s']:.1f} s" for r in cli) + ".")
    smol = [r for r in results if r["config"] == "smollm2-135m-shaped"]
    lines.append("")
    if smol and smol[0]["mfu"] is not None:
        s = smol[0]
        lines.append(f"SmolLM2-135M-shaped on {s['device']} ({s['dtype']}, batch {s['batch_size']}): fisher "
                     f"{s['tokens_per_s']['fisher']:.0f} tokens/s, MFU {100 * s['mfu']['fisher']:.1f} % "
                     f"(bare {100 * s['mfu']['bare']:.1f} %), ratio {s['ratio']:.2f}× vs bare.")
    else:
        lines.append("GPU tokens/s and MFU for the SmolLM2-135M-shaped model (`--smollm2-shaped --device cuda`): "
                     "**not measured** — no GPU on this machine. The CUDA path (bf16 weights, fp32 sums, "
                     "`--gradient-checkpointing`) is exercised only by its CPU twin in the tests.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--data", default="math", choices=sorted(SHIPPED_DATA))
    parser.add_argument("--examples", type=int, default=None, help="default: the whole set")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--also", nargs="*", default=[], choices=["hooks", "vmap", "loop"],
                        help="also time these per-example backends")
    parser.add_argument("--cli-runs", type=int, default=1, help="whole-process `sarmerge fisher` runs (0 = skip)")
    parser.add_argument("--smollm2-shaped", action="store_true", help="GPU MFU run on a SmolLM2-135M-shaped model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100 SXM bf16 dense: 989)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the BENCHMARKS.md section from bench/results/fisher.json without measuring")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((ROOT / "bench" / "results" / "fisher.json").read_text())
        args = argparse.Namespace(**saved["args"])
        text = report(saved["results"], args, saved["machine"])
        print(text)
        write_section("fisher", text)
        return
    torch.set_num_threads(args.threads)
    results = []
    if args.smollm2_shaped:
        results.append(smollm2_benchmark(args))
    else:
        results = [cpu_benchmark(name, args) for name in args.configs]
    out = ROOT / "bench" / "results" / ("fisher_smollm2.json" if args.smollm2_shaped else "fisher.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=2) + "\n")
    text = report(results, args)
    print(text)
    if not args.no_write and not args.smollm2_shaped:
        write_section("fisher", text)


if __name__ == "__main__":
    main()
