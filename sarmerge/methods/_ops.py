"""Tensor operations shared by several merge methods."""

from __future__ import annotations

import torch


def topk_mask(x: torch.Tensor, k: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k largest |x| (optionally only among `within`); ties go to the lowest flat index.

    O(n) via kthvalue instead of a full sort, with an exact count even when magnitudes tie (common for updates of
    bf16 weights, which take few distinct values).
    """
    mag = x.abs().flatten()
    if within is not None:
        # Entries outside the allowed set can never win: give them -1 (below any magnitude).
        mag = torch.where(within.flatten(), mag, torch.full_like(mag, -1.0))
    n = mag.numel()
    if k >= n:
        mask = torch.ones(n, dtype=torch.bool, device=x.device)
        return (mask if within is None else within.flatten().clone()).reshape(x.shape)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    # kthvalue finds the k-th smallest; the k-th largest is the (n-k+1)-th smallest.
    thr = torch.kthvalue(mag.cpu() if mag.device.type == "mps" else mag, n - k + 1).values
    mask = mag > thr
    missing = k - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(mag == thr).flatten()[:missing]
        mask[tied] = True
    if within is not None:
        mask &= within.flatten()
    return mask.reshape(x.shape)


def keep_top_fraction(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top-`density` fraction of |x| (k = int(density·n), as mergekit counts)."""
    if density >= 1.0:
        return x
    return x * topk_mask(x, int(density * x.numel()))


def sign_consensus_merge(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES election and disjoint mean: γ = sgn(Σ w_t τ̂_t); average the weighted entries that agree with γ."""
    stacked = torch.stack([w * d for w, d in zip(weights, deltas, strict=True)])
    gamma = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    num = (stacked * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        out.add_(d, alpha=w)
    return out
