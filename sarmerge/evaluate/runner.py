"""`evaluate()`: generate with a backend, score every sample, write per-sample records and a summary.

Everything that can be wrong with the inputs (suite names, data files, model directory, numbers) is checked before
the model is loaded; outputs appear atomically (a killed run leaves no half-written directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sarmerge import __version__
from sarmerge.checkpoint import atomic_output_dir
from sarmerge.errors import SarmergeError
from sarmerge.evaluate.backends import (
    PromptBuilder,
    SamplingSettings,
    check_model_dir,
    load_model_tokenizer,
    make_backend,
    resolve_backend,
)
from sarmerge.evaluate.benchmarks import Item, LoadRequest, ScoreContext, Suite, resolve_suites
from sarmerge.evaluate.metrics import summarize
from sarmerge.evaluate.sandbox import Sandbox
from sarmerge.layout import sha256_file
from sarmerge.options import EvaluateOptions

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


def parse_data_args(values: Sequence[str], suites: Sequence[Suite]) -> dict[str, Path]:
    """`--data SUITE=PATH` (repeatable); a bare PATH is allowed when exactly one suite is evaluated."""
    names = {s.name for s in suites}
    data: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(suites) != 1:
                raise SarmergeError(f"--data {value!r}: name the suite (--data SUITE=PATH) when evaluating several")
            name, path = suites[0].name, value
        if name not in names:
            raise SarmergeError(f"--data {value!r}: suite {name!r} is not being evaluated ({', '.join(sorted(names))})")
        data[name] = Path(path)
    return data


def load_items(suite: Suite, *, data: Path | None, seed: int, limit: int | None) -> list[Item]:
    items = suite.load(LoadRequest(data=data, seed=seed, limit=limit))
    return items[:limit] if limit else items


def evaluate(
    model_dir: str | Path,
    suites: str | Sequence[str] = "math,code",
    options: EvaluateOptions | None = None,
    *,
    out: str | Path | None = None,
    data: Mapping[str, str | Path] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate a checkpoint on benchmark suites; returns the summary (also written to OUT/summary.json).

    `suites`: names, groups (`math`, `code`) or families (`reasoning_gym:<task>`), comma-separated or a list.
    The knobs are `EvaluateOptions` (an object, keyword arguments, or both): `n` samples per problem (temperature 0
    = greedy), `limit`, backend, sandbox limits ... `data` maps suite names to the user's own data files.
    Suites that run model output (code, reasoning-gym) refuse to start, before the model loads, when the sandbox
    cannot isolate on this machine, unless `allow_unisolated=True`; the summary's `sandbox` records the mode and
    every probed guarantee either way.
    """
    started = time.perf_counter()
    opts = EvaluateOptions.resolve(options, settings, where="evaluate")
    limit, n, temperature, top_p, seed = opts.limit, opts.n, opts.temperature, opts.top_p, opts.seed
    batch_size, max_new_tokens, allow_unisolated = opts.batch_size, opts.max_new_tokens, opts.allow_unisolated
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    chosen = resolve_suites(suites)
    data_files = {k: Path(v) for k, v in (data or {}).items()}
    unknown = set(data_files) - {s.name for s in chosen}
    if unknown:
        raise SarmergeError(f"data given for suites not being evaluated: {', '.join(sorted(unknown))}")
    backend_name = resolve_backend(opts.backend)
    model_path = check_model_dir(model_dir)
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise SarmergeError(f"{out_path}: output already exists (pass --overwrite to replace it)")

    loaded = {s.name: load_items(s, data=data_files.get(s.name), seed=seed, limit=limit) for s in chosen}
    sandboxes: list[Sandbox] = []

    def sandbox() -> Sandbox:
        if not sandboxes:
            sandboxes.append(Sandbox(opts.sandbox_limits()))
        return sandboxes[0]

    sandboxed = [s.name for s in chosen if s.sandboxed]
    if sandboxed:  # refuse before the (slow) model load, not after generation
        sandbox().require_isolation(allow_unisolated, what=f"suites {', '.join(sandboxed)}")
    tokenizer = load_model_tokenizer(model_path)
    builder = PromptBuilder(tokenizer, use_chat_template=opts.use_chat_template)
    engine = make_backend(backend_name, model_path, tokenizer, device=opts.device, dtype=opts.dtype,
                          batch_size=batch_size, seed=seed)
    summary: dict[str, Any] = {
        "sarmerge_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(model_path.resolve()),
        "model_config_sha256": sha256_file(model_path / "config.json"),
        "backend": engine.info(),
        "generation": {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                       "batch_size": batch_size, "chat_template": builder.chat, "limit": limit},
        "seeds": {"generation": seed, "data": seed, "bootstrap": seed},
        "suites": {},
    }
    ctx_out = atomic_output_dir(out_path, overwrite=overwrite) if out_path else contextlib.nullcontext(None)
    with ctx_out as tmp:
        samples_fh = open(Path(tmp) / SAMPLES_FILE, "w", encoding="utf-8") if tmp else None  # noqa: SIM115
        try:
            for suite in chosen:
                summary["suites"][suite.name] = _run_suite(
                    suite, loaded[suite.name], engine, builder, sandbox, samples_fh,
                    SamplingSettings(n=n, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens or suite.max_new_tokens, seed=seed),
                    data_file=data_files.get(suite.name), workers=opts.workers, progress=progress,
                    allow_unisolated=allow_unisolated)
        finally:
            if samples_fh is not None:
                samples_fh.close()
        iso = sandboxes[0].isolation.as_dict() if sandboxes else None
        summary["sandbox"] = None if iso is None else {**iso, "limits": sandboxes[0].limits.__dict__,
                                                       "allow_unisolated": allow_unisolated}
        summary["network_isolated"] = None if iso is None else iso["network_isolated"]
        summary["overall"] = {
            "samples": sum(s["samples"] for s in summary["suites"].values()),
            "tokens_generated": sum(s["tokens_generated"] for s in summary["suites"].values()),
        }
        summary["seconds"] = round(time.perf_counter() - started, 3)
        if tmp:
            (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_suite(suite: Suite, items: list[Item], engine: Any, builder: PromptBuilder, sandbox: Any,
               samples_fh: Any, settings: SamplingSettings, *, data_file: Path | None, workers: int | None,
               progress: bool, allow_unisolated: bool = False) -> dict[str, Any]:
    rendered = [builder.render(it.prompt, it.completion_prompt) for it in items]
    t0 = time.perf_counter()
    with tqdm(total=len(items), desc=f"{suite.name} generate", unit="prompt", disable=not progress) as bar:
        generations = engine.generate(rendered, settings, on_progress=bar.update)
    gen_seconds = time.perf_counter() - t0
    flat_items = [it for it in items for _ in range(settings.n)]
    flat_texts = [g.text for gens in generations for g in gens]
    t1 = time.perf_counter()
    with tqdm(total=len(flat_texts), desc=f"{suite.name} score", unit="sample", disable=not progress) as bar:
        ctx = ScoreContext(sandbox_factory=sandbox, workers=workers, on_done=bar.update,
                           allow_unisolated=allow_unisolated)
        verdicts = suite.score(flat_items, flat_texts, ctx)
    score_seconds = time.perf_counter() - t1
    if len(verdicts) != len(flat_texts):
        raise SarmergeError(f"suite {suite.name}: scorer returned {len(verdicts)} verdicts for {len(flat_texts)} "
                            "samples")
    correct = []
    for i, (item, gens) in enumerate(zip(items, generations, strict=True)):
        row_verdicts = verdicts[i * settings.n:(i + 1) * settings.n]
        correct.append(sum(v.correct for v in row_verdicts))
        if samples_fh is None:
            continue
        for j, (gen, v) in enumerate(zip(gens, row_verdicts, strict=True)):
            record = {"suite": suite.name, "id": item.id, "sample": j, "prompt": rendered[i].text,
                      "completion": gen.text, "extracted": v.extracted, "reference": item.answer,
                      "verdict": "correct" if v.correct else "incorrect", "correct": v.correct, "detail": v.detail,
                      "score": v.score, "tokens": gen.tokens, "finish": gen.finish, "meta": item.meta}
            samples_fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    # a greedy sample generated once and repeated n times was generated once
    unique = [gens[:1] if settings.greedy else gens for gens in generations]
    tokens = sum(g.tokens for gens in unique for g in gens)
    metrics = summarize(correct, settings.n, seed=settings.seed)
    return {
        **metrics,
        "kind": suite.kind,
        "samples": len(flat_texts),
        "tokens_generated": tokens,
        "truncated_samples": sum(g.finish == "length" for gens in unique for g in gens),
        "max_new_tokens": settings.max_new_tokens,
        "seconds": {"generate": round(gen_seconds, 3), "score": round(score_seconds, 3)},
        "tokens_per_second": round(tokens / gen_seconds, 2) if gen_seconds > 0 else None,
        "source": suite.source,
        "data_file": str(data_file) if data_file else None,
        "data_sha256": sha256_file(data_file) if data_file else None,
    }
