"""Weighted average of the models (SPEC §4.1)."""

import torch

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods import _mergekit as mk


class LinearParams(mk.Dialect):
    normalize: bool = True


@merge_method("linear", params=LinearParams, needs_base=False, chunking="element",
              mergekit="mergekit accumulates in fp32 whatever the compute dtype (here: in the compute dtype)")
def linear(g: TensorGroup, p: LinearParams) -> torch.Tensor:
    """θ = Σ w_t θ_t / Σ w_t."""
    if p.mergekit:  # accumulated in fp32 whatever the compute dtype
        return mk.linear(g, p.normalize)
    out = torch.zeros_like(g.models[0])
    for w, m in zip(g.weights, g.models, strict=True):
        out.add_(m, alpha=w)
    total = sum(g.weights)
    return out / total if p.normalize and total != 0 else out
