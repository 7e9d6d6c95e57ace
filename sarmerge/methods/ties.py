"""TIES-Merging, Yadav et al. 2023 (SPEC §4.3)."""

from typing import Any, ClassVar

import torch
from pydantic import Field

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods._mergekit import Dialect, gta, magnitude
from sarmerge.methods._ops import (
    keep_top_fraction,
    radix_high,
    radix_low,
    sign_consensus_merge,
    streamed_topk_mask,
    top_count,
)


class TiesParams(Dialect):
    density: float = Field(0.2, gt=0, le=1, description="fraction kept per tensor: max(1, ⌊density·n⌋) entries")
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool | None = Field(None, description="semantics: mergekit only (default true): divide by the "
                                   "agreeing weights")
    rescale: bool | None = Field(None, description="semantics: mergekit only (default false): restore each "
                                 "trimmed τ's L1 norm")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"density": 1.0, "normalize": True, "rescale": False}
    MERGEKIT_ONLY = ("normalize", "rescale")


def _k(g: TensorGroup, p: TiesParams, i: int, numel: int) -> int:
    return top_count(g.density(i, p.density), numel)  # as keep_top_fraction counts


def _high_bits(g: TensorGroup, p: TiesParams) -> dict[str, torch.Tensor]:
    return {"ties_high": torch.stack([radix_high(d) for d in g.deltas])}


def _low_bits(g: TensorGroup, p: TiesParams) -> dict[str, torch.Tensor]:
    high = g.stats["ties_high"]
    low = [radix_low(d, high[i], _k(g, p, i, int(high[i].sum()))) for i, d in enumerate(g.deltas)]
    # `ties_taken` sums to zeros over the chunks; the merge pass counts the tied entries it keeps in it
    return {"ties_low": torch.stack(low), "ties_taken": torch.zeros(len(low), dtype=torch.int64)}


@merge_method("ties", params=TiesParams, chunking="multi_pass", stats=(_high_bits, _low_bits),
              mergekit="mergekit: density default 1.0 (here 0.2); normalize: false gives the sum of agreeing "
              "updates; rescale: true restores each trimmed τ's L1 norm; magnitude ties at the k-th place fall "
              "as torch's unstable sort puts them (here: lowest flat index first)")
def ties(g: TensorGroup, p: TiesParams) -> torch.Tensor:
    """Trim each τ_t to its top-density magnitudes, elect signs, disjoint mean; θ = θ₀ + λ·merged."""
    if p.mergekit:
        return gta(g, p, sparsify=magnitude, consensus=True)
    if g.stats is None:  # the whole tensor
        trimmed = [keep_top_fraction(d, g.density(i, p.density)) for i, d in enumerate(g.deltas)]
    else:  # a row chunk: the whole tensor's exact top-k from the statistics passes
        s = g.stats
        trimmed = [
            d.mul_(streamed_topk_mask(d, s["ties_high"][i], s["ties_low"][i],
                                      _k(g, p, i, int(s["ties_high"][i].sum())), s["ties_taken"][i : i + 1]))
            for i, d in enumerate(g.deltas)
        ]
    return g.base + p.lambda_ * sign_consensus_merge(trimmed, g.weights)
