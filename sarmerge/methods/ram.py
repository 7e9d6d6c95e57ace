"""Reinforced Agent Merging, arXiv 2601.13572 (SPEC §4.5)."""

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods import _mergekit as mk
from sarmerge.methods._ops import block_slices, blockwise


class RamParams(mk.Dialect):
    epsilon: float = Field(1e-5, ge=0)
    lambda_: float = Field(1.0, alias="lambda")


class RamPlusParams(RamParams):
    r: float = Field(2.0, ge=0, description="boost ceiling for unique updates: factor 1 + (r − 1)·min(1, ρ_t) "
                     "(mergekit's ramplus_tl: 1 + r·clamp(ρ_t, 0, alpha), r = 0.1)")
    alpha: float | None = Field(None, ge=0, description="semantics: mergekit only (default 0.2): cap on ρ_t")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"r": 0.1, "alpha": 0.2}
    MERGEKIT_ONLY = ("alpha",)

    @model_validator(mode="after")
    def _boost_at_least_one(self) -> "RamPlusParams":
        if not self.mergekit and self.r < 1:
            raise ValueError(f"r must be ≥ 1 (a boost ceiling); got {self.r}")
        return self


def supports(deltas: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Masks M_t = |τ_t| > ε and the per-entry mover count c = Σ M_t (accumulated, never stacked: a reduction over
    a stacked leading dimension is many times slower on CPU)."""
    movers = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(deltas[0].shape, dtype=torch.int16, device=deltas[0].device)
    for m in movers:
        count += m
    return movers, count


def weighted(weights: list[float], deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """w_t·τ_t (τ_t itself at w_t = 1: the same values without a pass)."""
    return [d if w == 1.0 else w * d for w, d in zip(weights, deltas, strict=True)]


def support_stats(g: TensorGroup, p: RamParams) -> dict[str, torch.Tensor]:
    """Per model t, how many entries it moved alone (unique_t) and together with others (overlap_t): [N, 2] int64.
    Sums over row chunks give the whole tensor's counts (a `stats` pass of the multi-pass streaming methods)."""
    counts = torch.zeros(len(g.weights), 2, dtype=torch.int64)
    flat = [d.reshape(-1) for d in g.deltas]
    for b in block_slices(flat[0]):  # in cache-sized blocks, as `blockwise`
        movers, count = supports(weighted(g.weights, [d[b] for d in flat]), p.epsilon)
        unique_mask, overlap_mask = count == 1, count >= 2
        for t, m in enumerate(movers):
            counts[t, 0] += int(torch.count_nonzero(m & unique_mask))
            counts[t, 1] += int(torch.count_nonzero(m & overlap_mask))
    return {"support_counts": counts}


def unique_boost(g: TensorGroup, p: RamPlusParams) -> list[float]:
    """RAM+ factor per model: 1 + (r − 1)·min(1, ρ_t), ρ_t = overlap_t / unique_t, over the whole tensor."""
    counts = (g.stats if g.stats is not None else support_stats(g, p))["support_counts"]
    return [1.0 + (p.r - 1.0) * min(1.0, overlap / unique if unique else 0.0) for unique, overlap in counts.tolist()]


def _ram(g: TensorGroup, p: RamParams, boosts: list[float] | None) -> torch.Tensor:
    def block(tensors: list[torch.Tensor]) -> torch.Tensor:
        base, deltas = tensors[0], weighted(g.weights, tensors[1:])
        movers, count = supports(deltas, p.epsilon)
        divisor = count.clamp(min=1).to(deltas[0].dtype)
        unique = count == 1 if boosts else None
        merged = torch.zeros_like(deltas[0])
        for t, d in enumerate(deltas):
            # a unique entry's divisor is 1, so d / divisor is exactly its own update there and the movers' mean
            # where several moved: one select per model (RAM+ adds the boost of the unique ones)
            share = d / divisor
            if boosts and boosts[t] != 1.0:
                share = torch.where(unique, d * boosts[t], share)
            merged += torch.where(movers[t], share, 0.0)
        return base + p.lambda_ * merged

    deltas = g.deltas  # before `base` is read: computing them checks that there is one
    return blockwise(block, [g.base, *deltas])


@merge_method("ram", params=RamParams, chunking="element",
              mergekit="mergekit's ram ignores weights and lambda; here w_t·τ_t enter the support test and the "
              "average")
def ram(g: TensorGroup, p: RamParams) -> torch.Tensor:
    """Keep τ_t where only model t moved; average the movers where several did."""
    if p.mergekit:
        return mk.ram(g, p.epsilon)
    return _ram(g, p, None)


@merge_method("ram_plus", params=RamPlusParams, chunking="multi_pass", stats=support_stats,
              mergekit="mergekit calls it ramplus_tl: boost 1 + r·clamp(ρ_t, 0, alpha) with r = 0.1, alpha = 0.2, "
              "weights ignored; here 1 + (r − 1)·min(1, ρ_t), r = 2, weighted τ_t")
def ram_plus(g: TensorGroup, p: RamPlusParams) -> torch.Tensor:
    """RAM with unique updates of model t boosted by 1 + (r − 1)·min(1, overlap_t / unique_t)."""
    if p.mergekit:
        return mk.ramplus_tl(g, p.epsilon, p.r, float(p.alpha))
    return _ram(g, p, unique_boost(g, p))
