"""Spherical linear interpolation between the base and one model (row-wise, as mergekit 0.1.5)."""

import torch
from pydantic import Field

from sarmerge.methods import Params, TensorGroup, merge_method


class SlerpParams(Params):
    t: float = Field(0.5, ge=0, le=1, description="0 = base_model, 1 = the other model")
    dot_threshold: float = Field(0.9995, gt=0, le=1, description="rows more collinear than this are lerped")


def slerp_rows(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float) -> torch.Tensor:
    shape = a.shape
    a2 = a.reshape(1, -1) if a.dim() < 2 else a.reshape(a.shape[0], -1)
    b2 = b.reshape(1, -1) if b.dim() < 2 else b.reshape(b.shape[0], -1)
    na = torch.linalg.vector_norm(a2, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b2, dim=1, keepdim=True)
    na = torch.where(na > 1e-8, na, torch.ones_like(na))
    nb = torch.where(nb > 1e-8, nb, torch.ones_like(nb))
    dot = ((a2 / na) * (b2 / nb)).sum(1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin = torch.sin(theta)
    safe_sin = torch.where(linear, torch.ones_like(sin), sin)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / safe_sin)
    cb = torch.where(linear, torch.full_like(dot, t), torch.sin(t * theta) / safe_sin)
    return (ca * a2 + cb * b2).reshape(shape)


@merge_method("slerp", params=SlerpParams, min_models=1, max_models=1, chunking="row")
def slerp(g: TensorGroup, p: SlerpParams) -> torch.Tensor:
    """Row-wise SLERP from base_model (t = 0) to the one listed model (t = 1)."""
    return slerp_rows(p.t, g.base, g.models[0], p.dot_threshold)
