"""TIES-Merging, Yadav et al. 2023 (SPEC §4.3)."""

import torch
from pydantic import Field

from sarmerge.methods import Params, TensorGroup, merge_method
from sarmerge.methods._ops import keep_top_fraction, sign_consensus_merge


class TiesParams(Params):
    density: float = Field(0.2, gt=0, le=1)
    lambda_: float = Field(1.0, alias="lambda")


@merge_method("ties", params=TiesParams)
def ties(g: TensorGroup, p: TiesParams) -> torch.Tensor:
    """Trim each τ_t to its top-density magnitudes, elect signs, disjoint mean; θ = θ₀ + λ·merged."""
    trimmed = [keep_top_fraction(d, g.density(i, p.density)) for i, d in enumerate(g.deltas)]
    return g.base + p.lambda_ * sign_consensus_merge(trimmed, g.weights)
