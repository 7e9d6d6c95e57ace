"""DARE, Yu et al. 2024 (SPEC §4.4): random drop with rescale, then task arithmetic or TIES."""

from typing import Any, ClassVar

import torch
from pydantic import Field

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods._mergekit import Dialect, bernoulli, gta
from sarmerge.methods._ops import sign_consensus_merge, weighted_sum


class DareParams(Dialect):
    density: float = Field(0.5, gt=0, le=1)
    lambda_: float = Field(1.0, alias="lambda")
    rescale: bool = Field(True, description="survivors scaled by 1/density (mergekit: to τ's L1 norm, per tensor)")
    normalize: bool | None = Field(None, description="semantics: mergekit only (default false): divide by the "
                                   "(agreeing) weights")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"density": 1.0, "normalize": False}
    MERGEKIT_ONLY = ("normalize",)


DARE_VS_MERGEKIT = ("survivors scaled by 1/density per entry here; mergekit restores each τ_t's L1 norm per tensor; "
                    "mergekit's density default is 1.0 (here 0.5); masks from its global torch RNG there, a per-"
                    "tensor seeded generator here (same distribution)")


def dropped(g: TensorGroup, p: DareParams) -> list[torch.Tensor]:
    """Drop each entry of τ_t with probability 1 − density (seeded per tensor), rescale survivors by 1/density."""
    out = []
    for i, d in enumerate(g.deltas):
        density = g.density(i, p.density)
        if density >= 1.0:
            out.append(d)
            continue
        keep = g.rand(d.shape) < density
        out.append(d * keep / density if p.rescale else d * keep)
    return out


@merge_method("dare_linear", params=DareParams, mergekit=DARE_VS_MERGEKIT)
def dare_linear(g: TensorGroup, p: DareParams) -> torch.Tensor:
    """DARE drop-and-rescale, then θ₀ + λ Σ w_t τ̂_t."""
    if p.mergekit:
        return gta(g, p, sparsify=bernoulli, consensus=False)
    return g.base + p.lambda_ * weighted_sum(dropped(g, p), g.weights)


@merge_method("dare_ties", params=DareParams,
              mergekit=DARE_VS_MERGEKIT + "; dare_ties: normalize false there (the sum of the agreeing updates), "
              "the disjoint mean here")
def dare_ties(g: TensorGroup, p: DareParams) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean."""
    if p.mergekit:
        return gta(g, p, sparsify=bernoulli, consensus=True)
    return g.base + p.lambda_ * sign_consensus_merge(dropped(g, p), g.weights)
