"""Fisher merging, Matena & Raffel 2022 (SPEC §4.7)."""

import torch
from pydantic import Field

from sarmerge.methods import Params, TensorGroup, merge_method


class FisherParams(Params):
    floor: float = Field(1e-6, gt=0, description="Fisher values are floored here so every weight has a voice")


@merge_method("fisher", params=FisherParams, needs_base=False, fisher="dense", chunking="element")
def fisher(g: TensorGroup, p: FisherParams) -> torch.Tensor:
    """θ = Σ w_t F_t θ_t / Σ w_t F_t."""
    num = torch.zeros_like(g.models[0])
    den = torch.zeros_like(g.models[0])
    for w, m, f in zip(g.weights, g.models, g.fishers, strict=True):
        wf = w * f.clamp(min=p.floor)
        num += wf * m
        den += wf
    return num / den
