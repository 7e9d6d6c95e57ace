"""Token-level divergence between an RL checkpoint and its base, along responses the RL model generates.

For every prompt the RL model writes a response (greedy by default, or sampled with a seed). Both models then score
the same prompt + response in one forward pass each, and at every response position t (the model is predicting
token y_t from the prompt and y_<t) we record, with p = RL and q = base next-token distributions at temperature 1:

- js: Jensen–Shannon divergence ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2, in **bits** (log base 2), so 0 ≤ js ≤ 1.
- near-zero: js ≤ `near_zero` (default 1e-3 bits): the RL model predicts essentially what the base predicts.
- rl_top_in_base_topk: the RL model's most likely token is among the base model's top-k tokens.
- dlogp: signed log p_RL(y_t) − log p_base(y_t) (natural log) of the token actually chosen.

Position: relative position r = t / L within a response of L tokens (0 ≤ r < 1); buckets start (r < 1/3), middle
(1/3 ≤ r < 2/3), end (r ≥ 2/3), and a 10-bin profile. "Large" positions are the top decile of js over all responses;
`share_of_large` says which bucket they fall in.

Prompt file: `.jsonl` / `.ndjson` → one JSON object per non-blank line with a string field "prompt" (other fields are
ignored); any other suffix → plain text, one prompt per non-blank line. The tokenizer's chat template, when it has one,
wraps each prompt as a single user turn with the generation prompt appended (`chat_template=False` to feed raw text).
A response ends at any id of `sarmerge.hf.end_of_response_ids` (generation_config.json's end-of-turn ids, then the
tokenizer's EOS, then config.json's): the rule Fisher estimation and evaluation use too.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sarmerge import __version__
from sarmerge.errors import SarmergeError
from sarmerge.hf import checkpoint_tokenizer, encode_prompt, end_of_response_ids, load_causal_lm

log = logging.getLogger(__name__)

BUCKETS = (("start", 0.0, 1 / 3), ("middle", 1 / 3, 2 / 3), ("end", 2 / 3, 1.0))
PROFILE_BINS = 10
LARGE_QUANTILE = 0.9
EXAMPLES = 3
_LN2 = math.log(2.0)


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits between softmax(logits_p) and softmax(logits_q) along the last dim.

    Computed in float64 from log-probabilities (accurate for tiny divergences); zero-probability entries contribute 0.
    """
    logp = torch.log_softmax(logits_p.double(), dim=-1)
    logq = torch.log_softmax(logits_q.double(), dim=-1)
    logm = torch.logaddexp(logp, logq) - _LN2
    p, q = logp.exp(), logq.exp()
    kl_pm = torch.where(p > 0, p * (logp - logm), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (logq - logm), torch.zeros_like(q)).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / _LN2).clamp_(0.0, 1.0)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file ({"prompt": ...} per line) or a plain-text file (one per line); see module doc."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SarmergeError(f"{path}: cannot read prompt file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SarmergeError(f"{path}: prompt file is not UTF-8 text ({e})") from e
    prompts = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SarmergeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise SarmergeError(
                f"{path}:{lineno}: expected an object with a non-empty string field 'prompt', got {line.strip()[:80]!r}"
            )
        prompts.append(prompt)
    if not prompts:
        raise SarmergeError(f"{path}: no prompts (the file is empty or blank)")
    return prompts


def _encode(tok: Any, prompt: str, chat_template: bool) -> list[int]:
    return encode_prompt(tok, prompt, chat_template=chat_template)


def _load_model(path: str | Path, device: torch.device, *, progress: bool) -> torch.nn.Module:
    return load_causal_lm(path, dtype=torch.float32, device=device, progress=progress)


def _bucket(r: float) -> str:
    for name, _, hi in BUCKETS:
        if r < hi:
            return name
    return BUCKETS[-1][0]


@torch.inference_mode()
def score_response(
    base: torch.nn.Module,
    rl: torch.nn.Module,
    prompt_ids: list[int],
    response_ids: list[int],
    *,
    top_k: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Per-position js / dlogp / rl_top_in_base_topk / rl_top_equals_base_top for one prompt + response."""
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    lo, hi = len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1
    lp = rl(input_ids=ids).logits[0, lo:hi].float()
    lq = base(input_ids=ids).logits[0, lo:hi].float()
    chosen = torch.tensor(response_ids, device=device)
    logp = torch.log_softmax(lp.double(), -1)
    logq = torch.log_softmax(lq.double(), -1)
    rl_top = lp.argmax(-1)
    base_topk = lq.topk(min(top_k, lq.shape[-1]), dim=-1).indices
    return {
        "js": js_divergence(lp, lq).cpu().numpy(),
        "dlogp": (logp.gather(-1, chosen[:, None]) - logq.gather(-1, chosen[:, None]))[:, 0].cpu().numpy(),
        "in_topk": (base_topk == rl_top[:, None]).any(-1).cpu().numpy(),
        "same_top": (rl_top == base_topk[:, 0]).cpu().numpy(),
    }


def _generate(
    rl: torch.nn.Module,
    tok: Any,
    batch: list[list[int]],
    *,
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    top_p: float,
    device: torch.device,
    stops: list[int],
) -> list[list[int]]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    kwargs: dict[str, Any] = {"do_sample": sample}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=None)
    with torch.inference_mode():
        out = rl.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            pad_token_id=pad,
            eos_token_id=stops or None,
            **kwargs,
        )
    responses = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        if end is not None:
            row = row[: end + 1]  # keep the end-of-response decision, drop the padding after it
        responses.append(row)
    return responses


def analyze_tokens(
    base: str | Path,
    model: str | Path,
    prompts: str | Path,
    *,
    max_new_tokens: int = 128,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    near_zero: float = 1e-3,
    top_k: int = 5,
    max_prompts: int | None = None,
    chat_template: bool = True,
    batch_size: int = 8,
    device: str = "cpu",
    threads: int | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Compute the token report: (summary dict, per-response records with per-position arrays)."""
    from sarmerge.analysis.geometry import open_family

    for flag, value, ok in (
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1),
        ("--top-k", top_k, top_k >= 1),
        ("--near-zero", near_zero, near_zero >= 0),
        ("--batch-size", batch_size, batch_size >= 1),
        ("--temperature", temperature, temperature > 0),
        ("--top-p", top_p, 0 < top_p <= 1),
        ("--max-prompts", max_prompts, max_prompts is None or max_prompts >= 1),
    ):
        if not ok:
            raise SarmergeError(f"{flag}: out of range: {value}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SarmergeError(f"--device {device}: CUDA is not available on this machine")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    texts = read_prompts(prompts)[:max_prompts]
    # Same checks as a merge: tensor names/shapes/dtypes, architecture and vocabulary must match the base.
    base_ckpt, (rl_ckpt,) = open_family(base, [model], allow_pickle=allow_pickle)
    base_ckpt.close()
    rl_ckpt.close()
    tok = checkpoint_tokenizer(model)
    stops = end_of_response_ids(model, tok)
    dev = torch.device(device)
    rl_model, base_model = _load_model(model, dev, progress=progress), _load_model(base, dev, progress=progress)
    encoded = []
    for i, text in enumerate(texts):
        ids = _encode(tok, text, chat_template)
        if not ids:
            raise SarmergeError(f"{prompts}: prompt {i + 1} encodes to no tokens: {text[:80]!r}")
        encoded.append(ids)

    records: list[dict[str, Any]] = []
    torch.manual_seed(seed)
    bar = tqdm(total=len(encoded), unit="prompt", desc="analyze tokens", disable=not progress)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        responses = _generate(
            rl_model,
            tok,
            batch,
            max_new_tokens=max_new_tokens,
            sample=sample,
            temperature=temperature,
            top_p=top_p,
            device=dev,
            stops=stops,
        )
        for j, (p_ids, r_ids) in enumerate(zip(batch, responses, strict=True)):
            scores = score_response(base_model, rl_model, p_ids, r_ids, top_k=top_k, device=dev)
            records.append(
                {
                    "index": start + j,
                    "prompt": texts[start + j],
                    "response": tok.decode(r_ids, skip_special_tokens=True),
                    "tokens": [tok.decode([t]) for t in r_ids],
                    "token_ids": r_ids,
                    "finished": r_ids[-1] in stops,
                    **scores,
                }
            )
            bar.update(1)
    bar.close()
    summary = summarize(records, near_zero=near_zero, top_k=top_k)
    report = {
        "kind": "tokens",
        "sarmerge_version": __version__,
        "base": str(base),
        "model": str(model),
        "prompts_file": str(prompts),
        "settings": {
            "max_new_tokens": max_new_tokens,
            "decoding": "sample" if sample else "greedy",
            "temperature": temperature if sample else None,
            "top_p": top_p if sample else None,
            "seed": seed,
            "near_zero": near_zero,
            "top_k": top_k,
            "chat_template": chat_template,
            "stop_token_ids": stops,
            "batch_size": batch_size,
            "device": device,
            "js_unit": "bits",
            "dlogp_unit": "nats",
            "large_quantile": LARGE_QUANTILE,
        },
        **summary,
        "examples": [_jsonable(r) for r in records[:EXAMPLES]],
        "timings_s": {"total": round(time.perf_counter() - t0, 3)},
    }
    return report, records


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in rec.items():
        if isinstance(v, np.ndarray):
            v = [round(float(x), 7) for x in v] if v.dtype.kind == "f" else [bool(x) for x in v]
        out[k] = v
    return out


def summarize(records: list[dict[str, Any]], *, near_zero: float, top_k: int) -> dict[str, Any]:
    """Aggregate per-position arrays into the summary, position buckets, profile and per-response table."""
    js = np.concatenate([r["js"] for r in records])
    dlogp = np.concatenate([r["dlogp"] for r in records])
    in_topk = np.concatenate([r["in_topk"] for r in records])
    same_top = np.concatenate([r["same_top"] for r in records])
    rel = np.concatenate([np.arange(len(r["js"])) / len(r["js"]) for r in records])
    near = js <= near_zero
    large_cut = float(np.quantile(js, LARGE_QUANTILE))
    large = js >= large_cut if large_cut > 0 else js > 0
    n = len(js)
    buckets = {}
    for name, lo, hi in BUCKETS:
        sel = (rel >= lo) & ((rel < hi) if hi < 1 else (rel <= hi))
        buckets[name] = {
            "range": [lo, hi],
            "positions": int(sel.sum()),
            "js_mean": float(js[sel].mean()) if sel.any() else None,
            "near_zero_share": float(near[sel].mean()) if sel.any() else None,
            "share_of_large": float(large[sel].sum() / large.sum()) if large.any() else None,
        }
    edges = np.linspace(0, 1, PROFILE_BINS + 1)
    bins = np.minimum((rel * PROFILE_BINS).astype(int), PROFILE_BINS - 1)
    profile = {
        "bin_edges": edges.tolist(),
        "positions": [int((bins == b).sum()) for b in range(PROFILE_BINS)],
        "js_mean": [float(js[bins == b].mean()) if (bins == b).any() else None for b in range(PROFILE_BINS)],
        "non_near_zero_share": [
            float((~near[bins == b]).mean()) if (bins == b).any() else None for b in range(PROFILE_BINS)
        ],
    }
    summary = {
        "responses": len(records),
        "positions": n,
        "finished_share": float(np.mean([r["finished"] for r in records])),
        "js_mean": float(js.mean()),
        "js_median": float(np.median(js)),
        "js_p90": float(np.quantile(js, 0.9)),
        "js_max": float(js.max()),
        "near_zero_threshold": near_zero,
        "near_zero_share": float(near.mean()),
        "large_threshold": large_cut,
        "top_k": top_k,
        "rl_top_in_base_topk_share": float(in_topk.mean()),
        "rl_top_equals_base_top_share": float(same_top.mean()),
        "dlogp_mean": float(dlogp.mean()),
        "dlogp_median": float(np.median(dlogp)),
        "dlogp_positive_share": float((dlogp > 0).mean()),
        "dlogp_negative_share": float((dlogp < 0).mean()),
    }
    per_response = [
        {
            "index": r["index"],
            "prompt": r["prompt"][:200],
            "response": r["response"][:500],
            "tokens": len(r["js"]),
            "finished": r["finished"],
            "js_mean": float(r["js"].mean()),
            "js_max": float(r["js"].max()),
            "near_zero_share": float((r["js"] <= near_zero).mean()),
            "dlogp_sum": float(r["dlogp"].sum()),
        }
        for r in records
    ]
    return {"summary": summary, "position_buckets": buckets, "position_profile": profile, "per_response": per_response}


def write_positions(records: list[dict[str, Any]], path: Path) -> None:
    """One JSON line per response with every per-position value (for audit and custom plots)."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(_jsonable(r)) + "\n")


def token_report(
    base: str | Path,
    model: str | Path,
    prompts: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Analyze, then write `out/` atomically: report.json, positions.jsonl, PNG plots, report.html and report.md.

    `kwargs` go to `analyze_tokens`. Returns the report (summary, buckets, profile, per-response table, examples).
    """
    from dataclasses import asdict

    from sarmerge.analysis.plots import token_plots
    from sarmerge.analysis.report import render_report
    from sarmerge.checkpoint import atomic_output_dir

    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        report, records = analyze_tokens(base, model, prompts, **kwargs)
        report["plots"] = [asdict(p) for p in token_plots(report, records, tmp)]
        write_positions(records, tmp / "positions.jsonl")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        render_report(tmp, tokens={**report, "_dir": str(tmp)}, title="sarmerge token-level divergence")
    log.info("token report (%d responses) written to %s", report["summary"]["responses"], out)
    return report
