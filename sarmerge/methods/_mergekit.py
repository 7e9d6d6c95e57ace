"""mergekit 0.1.5 semantics (SPEC §4.8), written here from reading its source, arithmetic order included.

Methods whose parameters say `semantics: mergekit` (what a mergekit YAML becomes, see `sarmerge.config`) call these
kernels instead of sarmerge's own. They mirror mergekit's operation order (stacked task vectors, sums over the model
axis, the same dtype promotions, the same torch sorts for top-k, so magnitude ties fall the same way with the same
torch build) so deterministic merges give the same bytes; they merge whole tensors. Random masks come from
sarmerge's per-tensor seeded generator, not torch's global RNG: same distribution, other draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from sarmerge.methods import Chunking, Params, TensorGroup

Semantics = Literal["sarmerge", "mergekit"]
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: below this norm nothing is rescaled


class Dialect(Params):
    """Parameters of a method that mergekit also has: `semantics` picks whose definition runs.

    `MERGEKIT_DEFAULTS` fills mergekit's defaults (keys as written in YAML) when `semantics: mergekit` leaves them
    out; `MERGEKIT_ONLY` names fields that mean something only under mergekit semantics (an error otherwise).
    """

    semantics: Semantics = Field("sarmerge", description="whose definition runs: sarmerge's or mergekit 0.1.5's "
                                 "(what a mergekit YAML sets)")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {}
    MERGEKIT_ONLY: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _mergekit_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("semantics") == "mergekit":
            return {**cls.MERGEKIT_DEFAULTS, **data}
        return data

    @model_validator(mode="after")
    def _mergekit_only_fields(self) -> Dialect:
        if self.semantics != "mergekit":
            used = [f for f in self.MERGEKIT_ONLY if getattr(self, f) is not None]
            if used:
                raise ValueError(f"{', '.join(used)}: only meaningful with semantics: mergekit")
        return self

    @property
    def mergekit(self) -> bool:
        return self.semantics == "mergekit"

    def chunking(self) -> Chunking | None:
        return "tensor" if self.mergekit else None

    def recorded(self) -> dict[str, Any]:
        # a sarmerge-native config records what it always recorded: no semantics, no unset mergekit-only fields
        data = super().recorded()
        if not self.mergekit:
            data.pop("semantics")
            for f in self.MERGEKIT_ONLY:
                data.pop(f)
        return data


# ---- sparsification (mergekit.sparsify) ----------------------------------------------------------------------------


def rescaled_masked(tensor: torch.Tensor, mask: torch.Tensor, l1: bool) -> torch.Tensor:
    """tensor·mask, rescaled to the unmasked tensor's L1 norm (per tensor) when `l1`."""
    masked = tensor * mask
    if not l1:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def magnitude(g: TensorGroup, d: torch.Tensor, density: float, l1: bool, **_: Any) -> torch.Tensor:
    """Keep the top max(1, ⌊density·n⌋) magnitudes."""
    if density >= 1:
        return d
    if density <= 0 or d.numel() == 0:
        return torch.zeros_like(d)
    k = max(1, int(density * d.numel()))
    mask = torch.zeros(d.numel(), dtype=d.dtype, device=d.device)
    # torch's (unstable) descending argsort, as mergekit: equal magnitudes at the k-th place fall as they fall there
    mask[torch.argsort(_sort_keys(d), descending=True)[:k]] = 1
    return rescaled_masked(d, mask.reshape_as(d), l1)


def _sort_keys(d: torch.Tensor) -> torch.Tensor:
    w = d.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def magnitude_outliers(g: TensorGroup, d: torch.Tensor, density: float, l1: bool, gamma: float = 0.01,
                       **_: Any) -> torch.Tensor:
    """Drop the top ⌊gamma·n⌋ magnitudes (fewer if that would eat into the kept ones), keep the next ⌊density·n⌋."""
    if density >= 1:
        return d
    n = d.numel()
    keep_n = int(density * n)
    bottom_n = max(0, n - keep_n - int(gamma * n))  # the outlier cut shrinks if it would eat into the kept ones
    mask = torch.zeros(n, dtype=d.dtype, device=d.device)
    mask[torch.sort(_sort_keys(d), descending=False).indices[bottom_n : bottom_n + keep_n]] = 1
    return rescaled_masked(d, mask.reshape_as(d), l1)


def _work_dtype(d: torch.Tensor) -> torch.dtype:
    # mergekit draws its masks in bf16 as is, in fp32 for other CPU dtypes (no fp16 bernoulli on CPU)
    return d.dtype if d.device.type != "cpu" or d.dtype == torch.bfloat16 else torch.float32


def bernoulli(g: TensorGroup, d: torch.Tensor, density: float, l1: bool, **_: Any) -> torch.Tensor:
    """Keep each entry with probability `density`."""
    if density >= 1:
        return d
    work = _work_dtype(d)
    mask = (g.rand(d.shape) < density).to(work)
    return rescaled_masked(d.to(work), mask, l1).to(d.dtype)


def della_magprune(g: TensorGroup, d: torch.Tensor, density: float, l1: bool, epsilon: float = 0.15,
                   **_: Any) -> torch.Tensor:
    """Keep probability rising linearly with the magnitude rank along dim 1, from density−ε to density+ε."""
    if density >= 1:
        return d
    if density <= 0:
        return torch.zeros_like(d)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density ± epsilon must lie in (0, 1) (mergekit); got {density} ± {epsilon}")
    shape, work = d.shape, _work_dtype(d)
    x = d.unsqueeze(0) if d.dim() < 2 else d
    ranks = x.abs().argsort(dim=1).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = (g.rand(probs.shape) < probs).to(work)
    return rescaled_masked(x.to(work), mask, l1).to(d.dtype).reshape(shape)


Sparsifier = Callable[..., torch.Tensor]


# ---- generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*) ------------------------------


def gta(g: TensorGroup, p: Any, *, sparsify: Sparsifier | None, consensus: bool, **extra: float) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge: sparsify each τ_t, weight, optional sign consensus, optional
    normalisation by the (agreeing) weights, λ, θ₀ + merged. Reads p.normalize, p.rescale, p.lambda_, p.density."""
    base = g.base
    density = getattr(p, "density", 1.0)
    rescale = bool(getattr(p, "rescale", False))
    deltas = torch.stack([
        sparsify(g, d, g.density(i, density), rescale, **extra) if sparsify else d
        for i, d in enumerate(g.deltas)
    ])
    weights = torch.tensor(g.weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if consensus:
        sign = deltas.sign().to(base.dtype)
        majority = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if p.normalize:
        mixed /= divisor
    if p.lambda_ != 1:
        mixed *= p.lambda_
    return (base + mixed).to(base.dtype)


# ---- the other methods -----------------------------------------------------------------------------------------------


def linear(g: TensorGroup, normalize: bool) -> torch.Tensor:
    """Σ w_t θ_t (/ Σ w_t), accumulated in fp32 (fp64 for fp64 inputs), returned in the inputs' dtype."""
    first = g.models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(g.weights, dtype=dtype)
    out = torch.zeros_like(first, dtype=dtype)
    for m, w in zip(g.models, weights.unbind(0), strict=True):
        out.addcmul_(m, w.to(first.device))
    if normalize:
        out.div_(weights.sum().to(first.device))
    return out.to(first.dtype)


def _ram_vectors(g: TensorGroup, epsilon: float) -> tuple[torch.Tensor, ...]:
    base = g.base
    tv = torch.stack([m - base for m in g.models]).view(len(g.models), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


def ram(g: TensorGroup, epsilon: float) -> torch.Tensor:
    """Unique updates kept, overlaps averaged over their movers; weights are ignored (as mergekit's `ram`)."""
    tv, nonzero, counts, overlap, unique = _ram_vectors(g, epsilon)
    tvz = tv * nonzero
    merged = (tvz * unique + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return g.base + merged.reshape_as(g.base)


def ramplus_tl(g: TensorGroup, epsilon: float, r: float, alpha: float) -> torch.Tensor:
    """RAM with unique updates of model t boosted by 1 + r·clamp(ρ_t, 0, α), ρ_t = shared_t / unique_t (tensor-
    local); weights are ignored (as mergekit's `ramplus_tl`)."""
    tv, nonzero, counts, overlap, unique = _ram_vectors(g, epsilon)
    shared_n = (nonzero & overlap).sum(dim=1)
    unique_n = (nonzero & unique).sum(dim=1)
    rho = shared_n / unique_n.clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    tvz = tv * nonzero
    merged = (tvz * unique * boost.unsqueeze(-1) + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return g.base + merged.reshape_as(g.base)


def model_stock(g: TensorGroup, filter_wise: bool) -> torch.Tensor:
    """Model Stock per tensor (per row with `filter_wise`), mergekit's cosine clamp and singularity rule."""
    w0, ws = g.base, list(g.models)
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)
