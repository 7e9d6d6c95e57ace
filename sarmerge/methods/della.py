"""DELLA, Deep et al. 2024: magnitude-ranked random pruning (MagPrune) with 1/p rescaling."""

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods._mergekit import Dialect, della_magprune, gta
from sarmerge.methods._ops import sign_consensus_merge, weighted_sum


class DellaParams(Dialect):
    density: float = Field(0.5, gt=0, le=1, description="mean keep probability")
    epsilon: float = Field(0.15, ge=0, description="keep probabilities span density ± epsilon by magnitude rank")
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool | None = Field(None, description="semantics: mergekit only (default true for della, false "
                                   "for della_linear)")
    rescale: bool | None = Field(None, description="semantics: mergekit only (default true): L1 rescale per "
                                 "tensor instead of 1/p per entry")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"density": 1.0, "normalize": True, "rescale": True}
    MERGEKIT_ONLY = ("normalize", "rescale")

    @model_validator(mode="after")
    def _spread_fits(self) -> "DellaParams":
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon <= 1):
            raise ValueError(
                f"density ± epsilon must lie in (0, 1]; got density={self.density}, epsilon={self.epsilon}"
            )
        return self


class DellaLinearParams(DellaParams):
    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"density": 1.0, "normalize": False, "rescale": True}


DELLA_VS_MERGEKIT = ("survivors scaled by 1/p per entry here; mergekit restores each tensor's L1 norm (rescale, "
                     "default true); density default 1.0 there (here 0.5), and density ± epsilon must lie strictly "
                     "inside (0, 1); ranks run along dim 1 there (rows flattened here: differs for ≥3-D tensors); "
                     "masks from its global torch RNG there, a per-tensor seeded generator here")


def magprune(g: TensorGroup, d: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Row-wise: larger |τ| → higher keep probability p ∈ [density−ε, density+ε]; survivors scaled by 1/p."""
    if density >= 1.0:
        return d
    rows = d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype)
    span = (rows.shape[1] - 1) or 1
    probs = (density - epsilon) + (ranks / span) * 2 * epsilon
    keep = g.rand(rows.shape) < probs
    return (rows * keep / probs).reshape(d.shape)


@merge_method("della", params=DellaParams, mergekit=DELLA_VS_MERGEKIT)
def della(g: TensorGroup, p: DellaParams) -> torch.Tensor:
    """MagPrune each τ_t, then TIES sign election and disjoint mean."""
    if p.mergekit:
        return gta(g, p, sparsify=della_magprune, consensus=True, epsilon=p.epsilon)
    pruned = [magprune(g, d, g.density(i, p.density), p.epsilon) for i, d in enumerate(g.deltas)]
    return g.base + p.lambda_ * sign_consensus_merge(pruned, g.weights)


@merge_method("della_linear", params=DellaLinearParams, mergekit=DELLA_VS_MERGEKIT)
def della_linear(g: TensorGroup, p: DellaLinearParams) -> torch.Tensor:
    """MagPrune each τ_t, then task arithmetic."""
    if p.mergekit:
        return gta(g, p, sparsify=della_magprune, consensus=False, epsilon=p.epsilon)
    pruned = [magprune(g, d, g.density(i, p.density), p.epsilon) for i, d in enumerate(g.deltas)]
    return g.base + p.lambda_ * weighted_sum(pruned, g.weights)
