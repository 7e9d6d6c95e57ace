"""Weighted average of the models (SPEC §4.1)."""

import torch

from sarmerge.methods import Params, TensorGroup, merge_method


class LinearParams(Params):
    normalize: bool = True


@merge_method("linear", params=LinearParams, needs_base=False, chunking="element")
def linear(g: TensorGroup, p: LinearParams) -> torch.Tensor:
    """θ = Σ w_t θ_t / Σ w_t."""
    out = torch.zeros_like(g.models[0])
    for w, m in zip(g.weights, g.models, strict=True):
        out.add_(m, alpha=w)
    total = sum(g.weights)
    return out / total if p.normalize and total != 0 else out
