"""Reinforced Agent Merging, arXiv 2601.13572 (SPEC §4.5)."""

import torch
from pydantic import Field

from sarmerge.methods import Params, TensorGroup, merge_method


class RamParams(Params):
    epsilon: float = Field(1e-5, ge=0)
    lambda_: float = Field(1.0, alias="lambda")


class RamPlusParams(RamParams):
    r: float = Field(2.0, ge=1, description="boost ceiling for unique updates: factor 1 + (r − 1)·min(1, ρ_t)")


def supports(deltas: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Masks M_t = |τ_t| > ε and the per-entry mover count c = Σ M_t (accumulated, never stacked: a reduction over
    a stacked leading dimension is many times slower on CPU)."""
    movers = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(deltas[0].shape, dtype=torch.int16, device=deltas[0].device)
    for m in movers:
        count += m
    return movers, count


def unique_boost(movers: list[torch.Tensor], count: torch.Tensor, r: float) -> list[float]:
    """RAM+ factor per model: 1 + (r − 1)·min(1, ρ_t), ρ_t = overlap_t / unique_t."""
    boosts = []
    unique_mask, overlap_mask = count == 1, count >= 2
    for m in movers:
        unique = int(torch.count_nonzero(m & unique_mask))
        overlap = int(torch.count_nonzero(m & overlap_mask))
        rho = overlap / unique if unique else 0.0
        boosts.append(1.0 + (r - 1.0) * min(1.0, rho))
    return boosts


def _ram(g: TensorGroup, p: RamParams, boosts: list[float] | None) -> torch.Tensor:
    deltas = [w * d for w, d in zip(g.weights, g.deltas, strict=True)]
    movers, count = supports(deltas, p.epsilon)
    unique, overlap = count == 1, count >= 2
    divisor = count.clamp(min=1).to(deltas[0].dtype)
    merged = torch.zeros_like(deltas[0])
    for t, d in enumerate(deltas):
        factor = boosts[t] if boosts else 1.0
        merged += torch.where(movers[t] & unique, d * factor, 0.0)
        merged += torch.where(movers[t] & overlap, d / divisor, 0.0)
    return g.base + p.lambda_ * merged


@merge_method("ram", params=RamParams, chunking="element")
def ram(g: TensorGroup, p: RamParams) -> torch.Tensor:
    """Keep τ_t where only model t moved; average the movers where several did."""
    return _ram(g, p, None)


@merge_method("ram_plus", params=RamPlusParams)
def ram_plus(g: TensorGroup, p: RamPlusParams) -> torch.Tensor:
    """RAM with unique updates of model t boosted by 1 + (r − 1)·min(1, overlap_t / unique_t)."""
    movers, count = supports([w * d for w, d in zip(g.weights, g.deltas, strict=True)], p.epsilon)
    return _ram(g, p, unique_boost(movers, count, p.r))
