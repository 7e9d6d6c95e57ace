"""Spherical linear interpolation between the base and one model: one slerp per whole tensor, as mergekit 0.1.5."""

import torch
from pydantic import Field

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods._mergekit import Dialect

# Norms and the dot product are summed over chunks of this many entries, in mergekit's order, so that large tensors
# round exactly as there (and the fp32 scratch stays bounded).
CHUNK_ELEMENTS = 1024 * 1024


class SlerpParams(Dialect):
    t: float = Field(0.5, ge=0, le=1, description="0 = base_model, 1 = the other model")
    dot_threshold: float = Field(0.9995, gt=0, le=1, description="tensors more collinear than this are lerped")


def slerp_tensor(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float, eps: float = 1e-8) -> torch.Tensor:
    """SLERP of the whole tensor a → b viewed as one vector, computed in fp32 (fp64 for fp64 inputs), returned in
    a's dtype; near-collinear (|cos| > dot_threshold) or antipodal pairs are interpolated linearly."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    flat_a, flat_b = a.reshape(1, -1), b.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype, device=a.device)
    n = flat_a.shape[1]
    if n == 0:
        return ((1 - tt) * flat_a + tt * flat_b).reshape(a.shape).to(a.dtype)
    spans = [(s, min(s + CHUNK_ELEMENTS, n)) for s in range(0, n, CHUNK_ELEMENTS)]

    def piece(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return x[:, s:e].to(dtype)

    # the norm of the chunk norms, like mergekit (not the square root of a sum of squares)
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(piece(flat_a, s, e), dim=1, keepdim=True) for s, e in spans]), dim=0)
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(piece(flat_b, s, e), dim=1, keepdim=True) for s, e in spans]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([
        (piece(flat_a, s, e) / norm_a * (piece(flat_b, s, e) / norm_b)).sum(dim=1, keepdim=True) for s, e in spans
    ]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(flat_a)
    for s, e in spans:
        out[:, s:e] = coef_a * piece(flat_a, s, e) + coef_b * piece(flat_b, s, e)
    return out.reshape(a.shape)


@merge_method("slerp", params=SlerpParams, min_models=1, max_models=1,
              mergekit="none: one slerp per whole tensor in fp32, norms and dot summed over 2^20-entry chunks, "
              "as mergekit (its YAML lists the base among the models; t as a gradient is not supported)")
def slerp(g: TensorGroup, p: SlerpParams) -> torch.Tensor:
    """SLERP from base_model (t = 0) to the one listed model (t = 1), one interpolation angle per whole tensor."""
    return slerp_tensor(p.t, g.base, g.models[0], p.dot_threshold)
