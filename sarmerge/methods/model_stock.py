"""Model Stock, Jang et al. 2024: interpolate the models' average toward the base by their update geometry."""

from typing import Any, ClassVar

import torch
from pydantic import Field

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods import _mergekit as mk


class ModelStockParams(mk.Dialect):
    filter_wise: bool | None = Field(None, description="semantics: mergekit only (default false = one t per "
                                     "tensor; true = per row)")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"filter_wise": False}
    MERGEKIT_ONLY = ("filter_wise",)


@merge_method("model_stock", params=ModelStockParams, min_models=2, chunking="row",
              mergekit="one t per row here; mergekit: one t per whole tensor unless filter_wise: true, norm "
              "products clamped at 1e-6, t = 0 where |1 + (N−1)·cos| < 1e-6 (here 1e-8)")
def model_stock(g: TensorGroup, p: ModelStockParams) -> torch.Tensor:
    """Per row: t = N·cos/(1 + (N−1)·cos) from the mean pairwise cosine of the τ_t; θ = t·mean(θ_t) + (1−t)·θ₀."""
    if p.mergekit:
        return mk.model_stock(g, bool(p.filter_wise))
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
