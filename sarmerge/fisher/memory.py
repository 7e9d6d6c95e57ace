"""A rough peak-memory estimate of a Fisher run, logged before it starts."""

from __future__ import annotations

from torch import nn

from sarmerge.fisher.per_example import DEFAULT_CHUNK_BYTES, _params


def estimate_memory(model: nn.Module, *, batch_size: int, seq_len: int, keep: int, backend: str,
                    gradient_checkpointing: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, int]:
    """Rough peak bytes by component (activations after Korthikanti et al. 2022, flash attention)."""
    params = _params(model)
    p0 = next(iter(params.values()))
    elem = p0.element_size()
    n_params = sum(p.numel() for p in params.values())
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(text, "hidden_size", 0) or 0
    layers = getattr(text, "num_hidden_layers", 0) or 0
    vocab = getattr(text, "vocab_size", 0) or 0
    rows = 1 if backend == "loop" else batch_size
    per_token_layer = 34 * hidden * elem // 2  # 34·h bytes per token per layer at 2-byte activations
    if gradient_checkpointing:
        activations = rows * seq_len * (layers * hidden * elem + per_token_layer)
    else:
        activations = rows * seq_len * layers * per_token_layer
    logits = rows * keep * vocab * (elem + 4 + 4)  # logits, fp32 log-softmax and its gradient
    largest = max(p.numel() for p in params.values()) * 4
    if backend == "vmap":
        per_example = min(batch_size, max(1, chunk_bytes // max(1, n_params * 4))) * n_params * 4
    elif backend == "hooks":
        per_example = min(batch_size * largest, max(largest, chunk_bytes))
    else:
        per_example = n_params * elem  # .grad
    return {"weights": n_params * elem, "fisher_sums": n_params * 4, "activations": activations, "logits": logits,
            "per_example_gradients": per_example}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
