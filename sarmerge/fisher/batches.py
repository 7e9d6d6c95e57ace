"""Right-padded batches of prompt + response and the response log-likelihood they are differentiated through."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sarmerge.fisher.data import Example


@dataclass
class Batch:
    """Right-padded sequences; `targets`/`mask` cover only the positions whose logits are kept."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, K-1): the tokens predicted by the last K positions but one
    mask: torch.Tensor  # (B, K-1) float: 1 on response tokens
    keep: int  # K = number of trailing positions whose logits are needed
    response_tokens: int
    total_tokens: int
    sequences: list[list[int]]
    response_starts: list[int]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def single(self, i: int) -> Batch:
        """Example i on its own, without padding."""
        return make_batch([self.sequences[i]], [self.response_starts[i]], self.input_ids.device, pad_id=0)


def make_batch(sequences: Sequence[Sequence[int]], response_starts: Sequence[int], device: torch.device | str,
               pad_id: int) -> Batch:
    """Right-pad `sequences` (prompt + response ids); response tokens are sequence[start:]."""
    bsz, width = len(sequences), max(len(s) for s in sequences)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    mask = torch.zeros(bsz, width, dtype=torch.float32)  # by the position of the predicted token
    for i, (seq, start) in enumerate(zip(sequences, response_starts, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, start : len(seq)] = 1.0
    first = min(response_starts) - 1  # first position whose logits predict a response token
    keep = width - first
    return Batch(
        input_ids=ids.to(device),
        targets=ids[:, first + 1 :].to(device),
        mask=mask[:, first + 1 :].to(device),
        keep=keep,
        response_tokens=int(mask.sum()),
        total_tokens=sum(len(s) for s in sequences),
        sequences=[list(s) for s in sequences],
        response_starts=list(response_starts),
    )


def examples_batch(examples: Sequence[Example], device: torch.device | str, pad_id: int) -> Batch:
    return make_batch([e.prompt_ids + e.response_ids for e in examples], [len(e.prompt_ids) for e in examples],
                      device, pad_id)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    cached = getattr(model, "_sarmerge_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(model.forward).parameters
        model._sarmerge_logits_to_keep = cached  # type: ignore[assignment]
    return bool(cached)


def response_logprob(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log p(response | prompt) per sequence, (B,), summed over response tokens, computed in fp32."""
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=batch.input_ids, use_cache=False, logits_to_keep=batch.keep).logits
    else:
        logits = model(input_ids=batch.input_ids, use_cache=False).logits[:, -batch.keep :]
    logits = logits[:, :-1].float()
    nll = nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    return -(nll.view_as(batch.mask) * batch.mask).sum(1)
