"""Task arithmetic (SPEC §4.2)."""

import torch
from pydantic import Field

from sarmerge.methods import Params, TensorGroup, merge_method
from sarmerge.methods._ops import weighted_sum


class TaskArithmeticParams(Params):
    lambda_: float = Field(1.0, alias="lambda")


@merge_method("task_arithmetic", params=TaskArithmeticParams, chunking="element")
def task_arithmetic(g: TensorGroup, p: TaskArithmeticParams) -> torch.Tensor:
    """θ = θ₀ + λ Σ w_t τ_t."""
    return g.base + p.lambda_ * weighted_sum(g.deltas, g.weights)
