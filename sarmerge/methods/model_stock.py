"""Model Stock, Jang et al. 2024: interpolate the models' average toward the base by their update geometry."""

import torch

from sarmerge.methods import Params, TensorGroup, merge_method


@merge_method("model_stock", params=Params, min_models=2, chunking="row")
def model_stock(g: TensorGroup, p: Params) -> torch.Tensor:
    """Per row: t = N·cos/(1 + (N−1)·cos) from the mean pairwise cosine of the τ_t; θ = t·mean(θ_t) + (1−t)·θ₀."""
    shape = g.base.shape
    rows = lambda x: x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)  # noqa: E731
    deltas = [rows(d) for d in g.deltas]
    n = len(deltas)
    cosines = [
        torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=1, eps=1e-12)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = torch.stack(cosines).mean(0).unsqueeze(1)
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() > 1e-8, n * cos / torch.where(denom.abs() > 1e-8, denom, torch.ones_like(denom)), 0.0)
    average = rows(g.base) + torch.stack(deltas).mean(0)  # mean of the θ_t, from the in-place task vectors
    return (t * average + (1 - t) * rows(g.base)).reshape(shape)
