"""Tensor operations shared by several merge methods."""

from __future__ import annotations

import math
from collections.abc import Callable

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
    thr = kth_largest(mag, k)
    mask = mag > thr
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        tied = torch.nonzero(mag == thr).flatten()[:missing]
        mask[tied] = True
    if within is not None:
        mask &= within.flatten()
    return mask.reshape(x.shape)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest of a flat tensor in O(n).

    A 64k-sample quantile brackets the answer, so kthvalue runs only on the few candidates inside the bracket;
    full kthvalue (≈10× slower on 30M entries) is the fallback when the bracket misses.
    """
    n = values.numel()
    if n <= 1 << 20:
        return torch.kthvalue(values, n - k + 1).values  # the (n-k+1)-th smallest
    gen = torch.Generator(device=values.device).manual_seed(0)
    sample = values[torch.randint(n, (1 << 16,), generator=gen, device=values.device)].float()
    q = 1.0 - k / n
    margin = 6 * math.sqrt(max(q * (1 - q), 1e-4) / sample.numel()) + 1e-4
    lo, hi = torch.quantile(sample, torch.tensor([max(0.0, q - margin), min(1.0, q + margin)], device=values.device))
    above = int(torch.count_nonzero(values > hi))
    if above < k:
        candidates = values[(values >= lo) & (values <= hi)]
        rank = k - above  # wanted: the rank-th largest candidate
        if 0 < rank <= candidates.numel():
            return torch.kthvalue(candidates, candidates.numel() - rank + 1).values
    return torch.kthvalue(values, n - k + 1).values


# Streamed exact top-k (radix select over row chunks): the same mask as `topk_mask` without the whole tensor.
# The int32 bit pattern of a non-negative float orders like its value, so the k-th largest |x| is found from a
# histogram of the patterns' high 16 bits (pass 1), then of the low 16 bits inside the boundary bin (pass 2); the
# merge pass keeps every entry above that threshold and the first `k − above` entries equal to it in flat order.
RADIX = 1 << 16


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as int32 bit patterns, flat (exact for fp32, bf16 and fp16 inputs)."""
    return x.abs().float().flatten().view(torch.int32)


def radix_high(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(magnitude_keys(x) >> 16, minlength=RADIX)


def _boundary(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The largest digit b with count(≥ b) ≥ k, and count(> b)."""
    at_least = hist.flip(0).cumsum(0)  # at_least[j] = count of digits ≥ RADIX − 1 − j
    j = int(torch.searchsorted(at_least, torch.tensor([k], dtype=at_least.dtype, device=at_least.device)))
    return RADIX - 1 - j, int(at_least[j - 1]) if j > 0 else 0


def radix_low(x: torch.Tensor, high: torch.Tensor, k: int) -> torch.Tensor:
    """Pass 2: histogram of the low 16 bits of the entries in the boundary bin of the whole tensor's `high`."""
    if not 0 < k < int(high.sum()):
        return torch.zeros(RADIX, dtype=torch.int64, device=x.device)
    digit, _ = _boundary(high, k)
    # 1 + offset into the boundary bin, entries below it clamped to bin 0 and above it to bin RADIX + 1: one pass,
    # cheaper than a masked select
    low = magnitude_keys(x).sub_((digit << 16) - 1).clamp_(0, RADIX + 1)
    return torch.bincount(low, minlength=RADIX + 2)[1 : RADIX + 1]


def streamed_topk_mask(x: torch.Tensor, high: torch.Tensor, low: torch.Tensor, k: int,
                       taken: torch.Tensor) -> torch.Tensor:
    """This chunk's part of `topk_mask(whole, k)`; `taken` (a one-element tensor, updated in place) counts the tied
    entries kept in earlier chunks. Chunks must come in row order."""
    n = int(high.sum())
    if k >= n:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    digit, above_high = _boundary(high, k)
    low_digit, above_low = _boundary(low, k - above_high)
    threshold = (digit << 16) | low_digit
    keys = magnitude_keys(x)
    mask = keys > threshold
    missing = k - above_high - above_low - int(taken)
    if missing > 0:
        tied = torch.nonzero(keys == threshold).flatten()[:missing]
        mask[tied] = True
        taken += tied.numel()
    return mask.reshape(x.shape)


def top_count(density: float, n: int) -> int:
    """How many entries a top-`density` trim keeps: max(1, ⌊density·n⌋) of a non-empty tensor (as mergekit counts:
    a positive density never empties a tensor), all of them at density ≥ 1."""
    if density >= 1.0:
        return n
    return max(1, int(density * n)) if n and density > 0 else 0


def keep_top_fraction(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zero, in place, all but the top-`density` fraction of |x| (`top_count` entries)."""
    if density >= 1.0:
        return x
    return x.mul_(topk_mask(x, top_count(density, x.numel())))


# Entries per block of an elementwise merge on a CPU (1 MiB of fp32): its tens of passes per block then run in cache
# instead of streaming every temporary of a 4 M-entry chunk through RAM (TIES election ≈ 1.7× faster on one thread).
CPU_BLOCK = 1 << 18


def blockwise(fn: Callable[[list[torch.Tensor]], torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """`fn` of same-shaped `inputs`, computed on CPU_BLOCK-entry slices of their flattened views (whole on a GPU).

    Only for elementwise `fn`: the result is then bitwise the same as `fn(inputs)`, with memory a few blocks
    beyond the inputs and the output.
    """
    out = torch.empty(inputs[0].shape, dtype=inputs[0].dtype, device=inputs[0].device)
    flat, o = [t.reshape(-1) for t in inputs], out.view(-1)
    for b in block_slices(o):
        o[b] = fn([f[b] for f in flat])
    return out


def block_slices(flat: torch.Tensor) -> list[slice]:
    """The CPU_BLOCK-entry slices of a flat tensor on a CPU; one slice over all of it on a GPU."""
    block = CPU_BLOCK if flat.device.type == "cpu" else max(1, flat.numel())
    return [slice(s, s + block) for s in range(0, flat.numel(), block)]


def sign_consensus_merge(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES election and disjoint mean: γ = sgn(Σ w_t τ̂_t); average the weighted entries that agree with γ."""
    return blockwise(lambda block: _sign_consensus_block(block, weights), deltas)


def _sign_consensus_block(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """An entry agrees when a = γ·w·τ̂ > 0, so Σ of the agreeing w·τ̂ is γ·Σ max(a, 0): four passes per model instead
    of eight (×±1 is exact, so the result is bitwise the same as summing the agreeing w·τ̂ directly)."""
    sign = torch.where(weighted_sum(deltas, weights) >= 0, 1.0, -1.0).to(deltas[0].dtype)  # γ, +1 where Σ = 0
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        aligned = d * sign
        if w != 1.0:
            aligned.mul_(w)
        den.add_((aligned > 0).to(den.dtype), alpha=w)
        num += aligned.clamp_(min=0)
    # + 0.0 turns the −0 of γ = −1 entries with no agreeing update into +0, as the direct sum gives
    return num.mul_(sign).add_(0.0).div_(torch.where(den != 0, den, torch.ones_like(den)))


def weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        out.add_(d, alpha=w)
    return out
