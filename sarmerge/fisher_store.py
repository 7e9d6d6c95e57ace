"""On-disk format of diagonal Fisher information, shared by the estimator (writer) and the merge engine (reader).

A Fisher store is a checkpoint directory (model.safetensors or shards) whose tensors carry the model's names, in fp32,
with metadata in the safetensors header (`sarmerge.fisher.*`). Two layouts:

- `dense`: each tensor has the parameter's full shape.
- `support`: only the entries where the model moved from its base are stored, as a 1-D tensor in row-major order of
  the mask |θ_t − θ₀| > ε (ε in the metadata). No indices are stored: the merge engine already holds θ_t − θ₀ and
  recomputes the mask, so the store costs exactly (support fraction) × dense size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sarmerge.checkpoint import Checkpoint, ShardedWriter
from sarmerge.errors import SarmergeError
from sarmerge.layout import parse_size

FORMAT_KEY = "sarmerge.fisher.format"
EPSILON_KEY = "sarmerge.fisher.epsilon"


def support_mask(tau: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Where a model moved from its base; `tau` must be θ_t − θ₀ in fp32."""
    return tau.abs() > epsilon


class FisherStore:
    """Reads a Fisher store lazily; `dense(name, tau)` returns the full-shaped Fisher (zeros off the support)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ckpt = Checkpoint(self.path)
        self.layout = self.ckpt.metadata.get(FORMAT_KEY, "dense")
        if self.layout not in ("dense", "support"):
            raise SarmergeError(f"{self.path}: unknown Fisher layout {self.layout!r} (expected dense or support)")
        self.epsilon = float(self.ckpt.metadata.get(EPSILON_KEY, "1e-5"))

    @property
    def metadata(self) -> dict[str, str]:
        return self.ckpt.metadata

    def check_matches(self, name: str, shape: tuple[int, ...]) -> None:
        """Preflight: the store has this tensor with a compatible shape."""
        if name not in self.ckpt.tensors:
            raise SarmergeError(f"{self.path}: Fisher has no tensor {name!r} (was it computed for this model?)")
        stored = self.ckpt.tensors[name].shape
        if self.layout == "dense" and stored != shape:
            raise SarmergeError(
                f"{self.path}: Fisher tensor {name!r} has shape {list(stored)}, model has {list(shape)}"
            )
        if self.layout == "support" and len(stored) != 1:
            raise SarmergeError(f"{self.path}: support-layout Fisher tensor {name!r} must be 1-D, got {list(stored)}")

    def dense(self, name: str, tau: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor's Fisher at full shape (`tau` = θ_t − θ₀ in fp32, needed for the support layout)."""
        return self.dense_rows(name, tau, None, 0)[0]

    def dense_rows(
        self, name: str, tau: torch.Tensor | None, rows: tuple[int, int] | None, offset: int
    ) -> tuple[torch.Tensor, int]:
        """Fisher for rows [r0, r1) of a tensor; `offset` = support values consumed by earlier rows (support layout).

        Returns the dense chunk and the number of support values it consumed.
        """
        if self.layout == "dense":
            return self.ckpt.read(name, rows).to(torch.float32), 0
        if tau is None:
            raise SarmergeError(
                f"{self.path}: stores Fisher on the update support only; this method needs dense Fisher"
            )
        mask = support_mask(tau, self.epsilon)
        count = int(torch.count_nonzero(mask))
        total = self.ckpt.info(name).numel
        if offset + count > total or (rows is None and count != total):
            raise SarmergeError(
                f"{self.path}: Fisher tensor {name!r} has {total} support values but the model moved at "
                f"{'more' if rows else count} positions (ε={self.epsilon}); it was computed against a different base"
            )
        values = self.ckpt.read(name, (offset, offset + count)).to(torch.float32)
        out = torch.zeros(tau.shape, dtype=torch.float32, device=tau.device)
        out.masked_scatter_(mask, values.to(tau.device))  # ~1.5x faster than out[mask] = values
        return out, count

    def close(self) -> None:
        self.ckpt.close()


def save_fisher(
    out_dir: Path,
    fisher: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    support_taus: dict[str, torch.Tensor] | None = None,
    epsilon: float = 1e-5,
    shard_size: str | int = "5GB",
) -> int:
    """Write a Fisher store into an existing (scratch) directory; returns bytes of tensor data written.

    With `support_taus` (name → θ_t − θ₀ in fp32) only the support entries are kept (layout `support`).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, f in fisher.items():
        f = f.detach().to("cpu", torch.float32)
        if support_taus is not None:
            f = f[support_mask(support_taus[name].to("cpu", torch.float32), epsilon)]
        tensors[name] = f.contiguous()
    meta = {
        **{k: str(v) for k, v in metadata.items()},
        FORMAT_KEY: "support" if support_taus is not None else "dense",
        EPSILON_KEY: repr(epsilon),
    }
    plan = [(n, tuple(t.shape), "F32") for n, t in tensors.items()]
    writer = ShardedWriter(out_dir, plan, parse_size(shard_size), meta)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    return writer.total_size
