"""The estimation loop: batches in a deterministic order, sampled responses, per-example squared gradient sums."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from sarmerge.errors import SarmergeError
from sarmerge.fisher.batches import examples_batch
from sarmerge.fisher.data import Example, Mode
from sarmerge.fisher.per_example import (
    BACKENDS,
    LoopBackend,
    PerExample,
    choose_backend,
    enable_gradient_checkpointing,
    new_sums,
)
from sarmerge.fisher.sampling import sample_responses


@dataclass
class FisherSums:
    """Running sums of per-example squared gradients (fp32), by canonical parameter name."""

    sums: dict[str, torch.Tensor]
    examples: int = 0
    response_tokens: int = 0
    total_tokens: int = 0
    backend: str = ""

    def fisher(self) -> dict[str, torch.Tensor]:
        if not self.examples:
            raise SarmergeError("no examples were processed")
        return {n: s / self.examples for n, s in self.sums.items()}


def processing_order(examples: Sequence[Example]) -> list[Example]:
    """Longest sequences first (stable): deterministic, so a resumed run forms the very same batches."""
    return sorted(examples, key=lambda e: -(len(e.prompt_ids) + max(len(e.response_ids), e.response_limit)))


def estimate_fisher(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    mode: Mode,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    eos_ids: set[int] | None = None,
    pad_id: int = 0,
    per_example: PerExample = "auto",
    gradient_checkpointing: bool = False,
    start: FisherSums | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[FisherSums], None] | None = None,
    on_batch: Callable[[FisherSums], None] | None = None,
    progress: bool = False,
) -> FisherSums:
    """Sum per-example squared gradients of log p(response | prompt) over `examples`, in batches.

    Batches are formed in `processing_order` (longest first, so similar lengths share a batch and little compute
    goes to padding; an out-of-memory batch shows up at once).

    `start` resumes from saved sums (its `examples` count says where); `on_checkpoint` is called at the first batch
    boundary after every `checkpoint_every` examples; `on_batch` after every batch.
    """
    device = next(model.parameters()).device
    model.eval()
    checkpoint_layers = enable_gradient_checkpointing(model) if gradient_checkpointing else None
    state = start or FisherSums(new_sums(model))
    backend_name = choose_backend(model, per_example, examples, device=device, pad_id=pad_id,
                                  gradient_checkpointing=gradient_checkpointing)
    backend = (LoopBackend(model, state.sums, checkpoint_layers) if backend_name == "loop"
               else BACKENDS[backend_name](model, state.sums))
    state.backend = backend_name
    ordered = processing_order(examples)
    last_checkpoint = state.examples
    bar = tqdm(total=len(examples), initial=state.examples, unit="ex", desc=f"fisher {mode}", disable=not progress,
               dynamic_ncols=True)
    t0, tokens0 = time.perf_counter(), state.total_tokens
    try:
        for begin in range(state.examples, len(examples), batch_size):
            chunk = ordered[begin : begin + batch_size]
            if mode == "sampled":
                responses = sample_responses(model, chunk, seed=seed, max_new_tokens=max_new_tokens,
                                             eos_ids=eos_ids or set(), pad_id=pad_id, device=device)
                chunk = [Example(e.index, e.line, e.prompt_ids, r) for e, r in zip(chunk, responses, strict=True)]
            batch = examples_batch(chunk, device, pad_id)
            backend.accumulate(batch)
            state.examples += len(chunk)
            state.response_tokens += batch.response_tokens
            state.total_tokens += batch.total_tokens
            bar.update(len(chunk))
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(tok_s=f"{(state.total_tokens - tokens0) / elapsed:.0f}", refresh=False)
            if on_checkpoint and checkpoint_every and state.examples - last_checkpoint >= checkpoint_every \
                    and state.examples < len(examples):
                on_checkpoint(state)
                last_checkpoint = state.examples
            if on_batch:
                on_batch(state)
    finally:
        bar.close()
    return state
