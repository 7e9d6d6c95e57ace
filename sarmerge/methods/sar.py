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

from sarmerge.methods import Chunking, Params, TensorGroup, merge_method
from sarmerge.methods._ops import blockwise, topk_mask
from sarmerge.methods.ram import support_stats, supports, unique_boost, weighted


class SarParams(Params):
    # Defaults: SPEC §4.6's reconstruction except `rescale`, set to ram_plus by the validation sweep of
    # bench/experiment.py (EXPERIMENTS.md §3: norm → ram_plus was the only knob that moved, +0.05 retained RL gain).
    epsilon: float = Field(1e-5, ge=0)
    sensitivity: Literal["fisher_delta2", "fisher", "delta2"] = "fisher_delta2"
    arbitration: Literal["hard", "fisher_avg", "hybrid"] = "hard"
    density: float = Field(1.0, gt=0, le=1)
    rescale: Literal["norm", "dare", "ram_plus", "none"] = "ram_plus"
    r: float = Field(2.0, ge=1, description="RAM+ boost ceiling, used by rescale: ram_plus")
    lambda_: float = Field(1.0, alias="lambda")

    def needs_fisher(self) -> bool:
        return self.sensitivity != "delta2" or self.arbitration != "hard"

    def chunking(self) -> Chunking:
        # Without sparsification every step is per entry: the norm and dare rescales are the identity, and RAM+'s
        # boost needs only the tensor's support counts, summed by the engine in a statistics pass.
        if self.density < 1.0:
            return "tensor"
        return "multi_pass" if self.rescale == "ram_plus" else "element"


def _sensitivity(p: SarParams, delta: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor:
    if p.sensitivity == "delta2":
        return delta * delta
    if p.sensitivity == "fisher":
        return fisher
    return fisher * delta * delta


@merge_method("sar", params=SarParams, fisher="any", stats=support_stats)
def sar(g: TensorGroup, p: SarParams) -> torch.Tensor:
    """SAR-Merging: unique updates kept, overlaps arbitrated by Fisher sensitivity, sparsified and rescaled."""
    deltas = weighted(g.weights, g.deltas)
    n = len(deltas)
    fishers = list(g.fishers) if p.needs_fisher() and g.fishers else [None] * n
    boosts = unique_boost(g, p) if p.rescale == "ram_plus" else []
    if p.density >= 1.0:
        # every step is per entry (the norm and dare rescales are the identity): computed in cache-sized blocks
        given = [i for i, f in enumerate(fishers) if f is not None]

        def block(ts: list[torch.Tensor]) -> torch.Tensor:
            fs: list[torch.Tensor | None] = [None] * n
            for j, i in enumerate(given):
                fs[i] = ts[1 + n + j]
            return _finish(p, ts[0], ts[1 : 1 + n], *_resolve(p, ts[1 : 1 + n], fs), boosts)

        return blockwise(block, [g.base, *deltas, *(fishers[i] for i in given)])
    merged, movers, unique, support = _resolve(p, deltas, fishers)
    norm_before = torch.linalg.vector_norm(merged)
    k = int(p.density * int(torch.count_nonzero(support)))
    merged = merged * topk_mask(merged, k, within=support)
    if p.rescale == "norm":
        norm_after = torch.linalg.vector_norm(merged)
        if norm_after > 0:
            merged = merged * (norm_before / norm_after)
    elif p.rescale == "dare":
        merged = merged / p.density
    return _finish(p, g.base, deltas, merged, movers, unique, support, boosts)


def _resolve(p: SarParams, deltas: list[torch.Tensor], fishers: list[torch.Tensor | None]
             ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Steps 1-4, per entry: (τ_m, movers M_t, unique U, support c ≥ 1)."""
    # Per-model running reductions throughout: reductions over a stacked model axis (argmax, sum) are pathologically
    # slow on CPU and cost N extra tensors of memory.
    movers, count = supports(deltas, p.epsilon)
    unique, overlap, support = count == 1, count >= 2, count >= 1

    # the movers' sum: on U it is the one mover's update exactly (the others add +0)
    moved = torch.zeros_like(deltas[0])
    for d, m in zip(deltas, movers, strict=True):
        moved += torch.where(m, d, 0.0)
    merged = torch.where(unique, moved, 0.0)
    if bool(overlap.any()):
        zeros = torch.zeros_like(deltas[0])
        fishers = [(f if f is not None else zeros) for f in fishers] if p.needs_fisher() else fishers
        # hard: the update of the most sensitive mover (first one on ties, like argmax); sensitivities are ≥ 0
        best_s = torch.full_like(deltas[0], -1.0)
        hard = torch.zeros_like(deltas[0])
        for d, m, f in zip(deltas, movers, fishers, strict=True):
            s = torch.where(m, _sensitivity(p, d, f), -1.0)
            better = s > best_s
            torch.maximum(best_s, s, out=best_s)
            torch.where(better, d, hard, out=hard)
        arbitrated = hard
        if p.arbitration != "hard":
            num, den = torch.zeros_like(hard), torch.zeros_like(hard)
            pos, neg = torch.zeros_like(overlap), torch.zeros_like(overlap)
            for d, m, f in zip(deltas, movers, fishers, strict=True):
                fm = torch.where(m, f, 0.0)
                num += fm * d
                den += fm
                pos |= m & (d > 0)
                neg |= m & (d < 0)
            plain = moved / count.clamp(min=1)
            # Where every mover has zero Fisher there is no evidence either way: the movers' mean.
            avg = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), plain)
            arbitrated = avg if p.arbitration == "fisher_avg" else torch.where(pos & neg, hard, avg)
        merged = torch.where(overlap, arbitrated, merged)
    return merged, movers, unique, support


def _finish(p: SarParams, base: torch.Tensor, deltas: list[torch.Tensor], merged: torch.Tensor,
            movers: list[torch.Tensor], unique: torch.Tensor, support: torch.Tensor, boosts: list[float]
            ) -> torch.Tensor:
    """Step 6's RAM+ boost and step 7, with the sub-ε drift's plain mean."""
    if boosts:
        factor = torch.ones_like(merged)  # boost_t on model t's unique entries (one mover there), 1 elsewhere
        for m, boost in zip(movers, boosts, strict=True):
            factor.masked_fill_(m & unique, boost)
        merged = merged * factor
    drift = torch.zeros_like(merged)
    for d in deltas:
        drift += d
    return base + p.lambda_ * merged + torch.where(support, 0.0, drift) / len(deltas)
