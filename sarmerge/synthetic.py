"""Synthetic RLVR-like checkpoint families for benchmarks and tests.

A Qwen2-shaped base with random bf16 weights and children whose updates touch a sparse random subset of entries
(default 20 %), written tensor by tensor so memory stays at one tensor whatever the size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sarmerge.checkpoint import DTYPE_CODES, ShardedWriter, parse_size


def qwen2_shapes(
    hidden: int, layers: int, vocab: int, intermediate: int, kv_heads: int = 2, heads: int = 8, tied: bool = False
) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,)}
    if not tied:  # tied embeddings: the checkpoint stores embed_tokens only (as Qwen2.5-0.5B/1.5B do)
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# Real models' shapes (from their config.json): the vocabulary is the padded embedding row count.
REAL_SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    # a Qwen2.5-style miniature (tied, two layers) for smoke runs of the same code path
    "qwen2-tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                   "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
}


def real_shapes(name: str) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Shapes and config.json of a real model's architecture (`REAL_SHAPES`), e.g. 'qwen2.5-1.5b'."""
    if name not in REAL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(REAL_SHAPES)}")
    c = REAL_SHAPES[name]
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **c, "max_position_embeddings": 32768,
           "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6}
    shapes = qwen2_shapes(c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"],
                          kv_heads=c["num_key_value_heads"], heads=c["num_attention_heads"],
                          tied=c["tie_word_embeddings"])
    return shapes, cfg


def family_shapes(params_target: float) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Qwen2-like shapes totalling about `params_target` parameters (scales layers at fixed width)."""
    hidden, vocab, intermediate = 1024, 32000, 2816
    per_layer = 2 * hidden * hidden + 2 * 256 * hidden + 3 * hidden * intermediate
    layers = max(1, round((params_target - 2 * vocab * hidden) / per_layer))
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    }
    return qwen2_shapes(hidden, layers, vocab, intermediate), cfg


def write_family(
    out: str | Path,
    params_target: float = 2.5e8,
    children: int = 3,
    update_fraction: float = 0.2,
    seed: int = 0,
    shard_size: str = "2GB",
    dtype: torch.dtype = torch.bfloat16,
    shape: str | None = None,
) -> list[Path]:
    """Write base + children under `out`; returns [base, child_1, ...]. Skips members that already exist.

    `shape` names a real architecture (`REAL_SHAPES`) instead of the `params_target`-sized default."""
    out = Path(out)
    shapes, cfg = real_shapes(shape) if shape else family_shapes(params_target)
    members = [out / "base"] + [out / f"child{i}" for i in range(1, children + 1)]
    if all((m / "config.json").exists() for m in members):
        return members
    plan = [(n, s, DTYPE_CODES[dtype]) for n, s in shapes.items()]
    writers = []
    for m in members:
        m.mkdir(parents=True, exist_ok=True)
        writers.append(ShardedWriter(m, plan, parse_size(shard_size)))
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        base = (
            torch.randn(shape, generator=gen) * 0.02
            if len(shape) > 1
            else 1.0 + 0.05 * torch.randn(shape, generator=gen)
        )
        writers[0].write(name, base.to(dtype))
        for w in writers[1:]:
            moved = torch.rand(shape, generator=gen) < update_fraction
            delta = torch.randn(shape, generator=gen) * 0.002 * moved
            w.write(name, (base + delta).to(dtype))
    for m, w in zip(members, writers, strict=True):
        w.close()
        (m / "config.json").write_text(json.dumps(cfg, indent=2))
    return members
