"""SAR-Merging: Sensitivity-aware Resolving Merging (SPEC §4.6, our reconstruction; every step is a knob).

1. supports M_t = |τ_t| > ε, count c = Σ M_t; unique U = {c = 1}, overlap O = {c ≥ 2}
2. sensitivity s_t = F_t ⊙ τ_t² (fisher_delta2) or F_t (fisher); delta2 = τ_t² needs no Fisher (ablation)
3. arbitration on O: hard (argmax_t s_t) | fisher_avg (Σ F_t τ_t / Σ F_t over movers) | hybrid
4. τ_m = unique updates on U + arbitrated updates on O
5. keep the top-density fraction of |τ_m| within its support
6. rescale: norm (restore ‖τ_m‖₂) | dare (1/density) | ram_plus (boost unique updates) | none
7. θ = θ₀ + λ τ_m

Entries where no model exceeds ε (sub-ε drift) take the plain mean of the τ_t, so that one model, or identical
models, merge back to exactly θ₁.
"""

from typing import Literal

import torch
from pydantic import Field

from sarmerge.methods import Params, TensorGroup, merge_method
from sarmerge.methods._ops import topk_mask
from sarmerge.methods.ram import supports, unique_boost


class SarParams(Params):
    epsilon: float = Field(1e-5, ge=0)
    sensitivity: Literal["fisher_delta2", "fisher", "delta2"] = "fisher_delta2"
    arbitration: Literal["hard", "fisher_avg", "hybrid"] = "hard"
    density: float = Field(1.0, gt=0, le=1)
    rescale: Literal["norm", "dare", "ram_plus", "none"] = "norm"
    r: float = Field(2.0, ge=1, description="RAM+ boost ceiling, used by rescale: ram_plus")
    lambda_: float = Field(1.0, alias="lambda")

    def uses_fisher(self) -> bool:
        return self.sensitivity != "delta2" or self.arbitration != "hard"

    def chunking(self) -> str:
        # Without sparsification the norm rescale is the identity and every step is per entry.
        return "element" if self.density >= 1.0 and self.rescale in ("norm", "none", "dare") else "tensor"


def _fisher_avg(deltas: torch.Tensor, fishers: torch.Tensor, movers: torch.Tensor) -> torch.Tensor:
    f = fishers * movers
    num = (f * deltas).sum(0)
    den = f.sum(0)
    plain = (deltas * movers).sum(0) / movers.sum(0).clamp(min=1)
    # Where every mover has zero Fisher there is no evidence either way: fall back to the movers' mean.
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), plain)


@merge_method("sar", params=SarParams, fisher="any", chunking=lambda p: p.chunking())
def sar(g: TensorGroup, p: SarParams) -> torch.Tensor:
    """SAR-Merging: unique updates kept, overlaps arbitrated by Fisher sensitivity, sparsified and rescaled."""
    deltas = torch.stack([w * d for w, d in zip(g.weights, g.deltas, strict=True)])
    movers, count = supports(list(deltas), p.epsilon)
    unique, overlap, support = count == 1, count >= 2, count >= 1

    merged = (deltas * (movers & unique)).sum(0)
    if bool(overlap.any()):
        fishers = None
        if p.uses_fisher():
            fishers = torch.stack([f if f is not None else torch.zeros_like(deltas[0]) for f in g.fishers])
        if p.sensitivity == "delta2":
            sens = deltas**2
        elif p.sensitivity == "fisher":
            sens = fishers.clone()
        else:
            sens = fishers * deltas**2
        sens = torch.where(movers, sens, torch.full_like(sens, -1.0))  # only movers compete
        hard = deltas.gather(0, sens.argmax(0, keepdim=True)).squeeze(0)
        if p.arbitration == "hard":
            arbitrated = hard
        else:
            avg = _fisher_avg(deltas, fishers, movers)
            if p.arbitration == "fisher_avg":
                arbitrated = avg
            else:  # hybrid: average where the movers agree in sign, hard choice where they conflict
                signs = torch.sign(deltas) * movers
                conflict = (signs > 0).any(0) & (signs < 0).any(0)
                arbitrated = torch.where(conflict, hard, avg)
        merged = torch.where(overlap, arbitrated, merged)

    norm_before = torch.linalg.vector_norm(merged)
    if p.density < 1.0:
        k = int(p.density * int(support.sum()))
        merged = merged * topk_mask(merged, k, within=support)
    if p.rescale == "norm":
        norm_after = torch.linalg.vector_norm(merged)
        if norm_after > 0:
            merged = merged * (norm_before / norm_after)
    elif p.rescale == "dare" and p.density < 1.0:
        merged = merged / p.density
    elif p.rescale == "ram_plus":
        for t, boost in enumerate(unique_boost(movers, count, p.r)):
            merged = torch.where(movers[t] & unique, merged * boost, merged)

    drift = (deltas * ~support).mean(0)
    return g.base + p.lambda_ * merged + drift
