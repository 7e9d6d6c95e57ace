"""Sampled responses for the true Fisher: temperature 1 over the full vocabulary, one random stream per example."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from sarmerge.fisher.batches import _accepts_logits_to_keep
from sarmerge.fisher.data import Example


def example_seed(seed: int, index: int) -> int:
    """The random stream of one example: independent of batching and of where a run resumed."""
    return int.from_bytes(hashlib.sha256(f"sarmerge-fisher:{seed}:{index}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def sample_responses(model: nn.Module, examples: Sequence[Example], *, seed: int, max_new_tokens: int,
                     eos_ids: set[int], pad_id: int, device: torch.device) -> list[list[int]]:
    """Draw one response per example from the model at temperature 1 over its full vocabulary (no top-k/top-p),
    with KV cache and left padding; stops at an EOS (kept in the response) or the example's token limit."""
    bsz = len(examples)
    width = max(len(e.prompt_ids) for e in examples)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    attention = torch.zeros(bsz, width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, width - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
        attention[i, width - len(e.prompt_ids) :] = 1
    # Inverse-CDF sampling with each example's own uniforms: the same draws whatever the batch composition.
    uniforms = torch.stack([
        torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(example_seed(seed, e.index)),
                   dtype=torch.float64)
        for e in examples
    ]).to(device)
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp_(min=0)
    first = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **first)
    responses: list[list[int]] = [[] for _ in examples]
    done = [e.response_limit <= 0 for e in examples]
    for step in range(max(e.response_limit for e in examples)):
        cdf = torch.softmax(out.logits[:, -1].float(), dim=-1).double().cumsum(-1)
        draw = (uniforms[:, step] * cdf[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, draw).squeeze(-1).clamp_(max=cdf.shape[-1] - 1).tolist()
        for i, e in enumerate(examples):
            if not done[i]:
                responses[i].append(tokens[i])
                done[i] = tokens[i] in eos_ids or len(responses[i]) >= e.response_limit
        if all(done):
            break
        feed = torch.tensor([[t if not d else pad_id] for t, d in zip(tokens, done, strict=True)], device=device)
        attention = torch.cat([attention, attention.new_ones(bsz, 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=feed, attention_mask=attention, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return responses
