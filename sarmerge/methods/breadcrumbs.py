"""Model Breadcrumbs, Davari & Belilovsky 2023: drop the largest outliers and the smallest updates."""

from typing import Any, ClassVar

import torch
from pydantic import Field

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods._mergekit import Dialect, gta, magnitude_outliers
from sarmerge.methods._ops import sign_consensus_merge, topk_mask, weighted_sum


class BreadcrumbsParams(Dialect):
    density: float = Field(0.9, gt=0, le=1, description="fraction of entries kept")
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of largest-magnitude entries removed first")
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool | None = Field(None, description="semantics: mergekit only (default false)")
    rescale: bool | None = Field(None, description="semantics: mergekit only (default false): L1 rescale")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"density": 1.0, "normalize": False, "rescale": False}
    MERGEKIT_ONLY = ("normalize", "rescale")


CRUMBS_VS_MERGEKIT = ("mergekit's density default is 1.0 (here 0.9), with an optional L1 rescale (rescale); "
                      "magnitude ties fall as torch's sort puts them there, lowest flat index first here")


def crumbs(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep the `density` fraction just below the top-`gamma` outliers (mergekit's magnitude_outliers)."""
    if density >= 1.0:
        return d
    n = d.numel()
    keep_n = int(density * n)
    top_n = min(int(gamma * n), n - keep_n)  # shrink the outlier cut if it would eat into the kept mass
    keep = topk_mask(d, keep_n + top_n) & ~topk_mask(d, top_n)
    return d * keep


@merge_method("breadcrumbs", params=BreadcrumbsParams, mergekit=CRUMBS_VS_MERGEKIT)
def breadcrumbs(g: TensorGroup, p: BreadcrumbsParams) -> torch.Tensor:
    """Breadcrumbs masking of each τ_t, then task arithmetic."""
    if p.mergekit:
        return gta(g, p, sparsify=magnitude_outliers, consensus=False, gamma=p.gamma)
    masked = [crumbs(d, g.density(i, p.density), p.gamma) for i, d in enumerate(g.deltas)]
    return g.base + p.lambda_ * weighted_sum(masked, g.weights)


@merge_method("breadcrumbs_ties", params=BreadcrumbsParams,
              mergekit=CRUMBS_VS_MERGEKIT + "; normalize false there (the sum of the agreeing updates), the "
              "disjoint mean here")
def breadcrumbs_ties(g: TensorGroup, p: BreadcrumbsParams) -> torch.Tensor:
    """Breadcrumbs masking, then TIES sign election and disjoint mean."""
    if p.mergekit:
        return gta(g, p, sparsify=magnitude_outliers, consensus=True, gamma=p.gamma)
    masked = [crumbs(d, g.density(i, p.density), p.gamma) for i, d in enumerate(g.deltas)]
    return g.base + p.lambda_ * sign_consensus_merge(masked, g.weights)
