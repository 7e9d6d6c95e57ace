"""Task arithmetic (SPEC §4.2)."""

from typing import Any, ClassVar

import torch
from pydantic import Field

from sarmerge.methods import TensorGroup, merge_method
from sarmerge.methods._mergekit import Dialect, gta
from sarmerge.methods._ops import weighted_sum


class TaskArithmeticParams(Dialect):
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool | None = Field(None, description="semantics: mergekit only (default false): divide by Σ w_t")

    MERGEKIT_DEFAULTS: ClassVar[dict[str, Any]] = {"normalize": False}
    MERGEKIT_ONLY = ("normalize",)


@merge_method("task_arithmetic", params=TaskArithmeticParams, chunking="element",
              mergekit="same formula; mergekit also takes normalize (divide by Σ w_t, default false) and sums "
              "stacked w_t·τ_t (rounding may differ in the last bit here)")
def task_arithmetic(g: TensorGroup, p: TaskArithmeticParams) -> torch.Tensor:
    """θ = θ₀ + λ Σ w_t τ_t."""
    if p.mergekit:
        return gta(g, p, sparsify=None, consensus=False)
    return g.base + p.lambda_ * weighted_sum(g.deltas, g.weights)
