"""Per-example squared gradients: the `hooks`, `vmap` and `loop` backends and the probe that picks one (see
`sarmerge.fisher`)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sarmerge.errors import SarmergeError
from sarmerge.fisher.batches import Batch, _accepts_logits_to_keep, make_batch, response_logprob
from sarmerge.fisher.data import Example
from sarmerge.options import PerExample

log = logging.getLogger("sarmerge.fisher")

# Per-example gradient buffers are built in slices of the batch no larger than this, so memory stays bounded for
# large parameters (a 150k × 1.5k embedding is 0.9 GB per example in fp32).
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024


class UnsupportedModel(Exception):
    """The hooks backend cannot see per-example structure in some module; `auto` falls back to `loop`."""


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical (deduplicated) parameter names, as `named_parameters()` gives them; tied weights appear once."""
    return dict(model.named_parameters())


@contextlib.contextmanager
def _requires_grad(model: nn.Module, flag: bool) -> Iterator[None]:
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, was in saved:
            p.requires_grad_(was)


@contextlib.contextmanager
def _layers_training(layers: Sequence[nn.Module]) -> Iterator[None]:
    """HF checkpoints a layer only in training mode: flip just those layers (their children, e.g. dropout, stay in
    eval mode), and only for the backward pass, since checkpointed layers refuse the KV cache sampling needs."""
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False


class LoopBackend:
    """One forward and backward per example; squares of `.grad` (tied weights already summed by autograd)."""

    name = "loop"

    def __init__(self, model: nn.Module, sums: dict[str, torch.Tensor],
                 checkpoint_layers: Sequence[nn.Module] | None = None) -> None:
        self.model, self.sums, self.params = model, sums, _params(model)
        self.checkpoint_layers = list(checkpoint_layers or [])

    def accumulate(self, batch: Batch) -> None:
        with _requires_grad(self.model, True), _layers_training(self.checkpoint_layers):
            for i in range(batch.size):
                for p in self.params.values():
                    p.grad = None
                response_logprob(self.model, batch.single(i)).sum().backward()
                for name, p in self.params.items():
                    if p.grad is not None:
                        g = p.grad.float()
                        self.sums[name].addcmul_(g, g)
                        p.grad = None


class VmapBackend:
    """`torch.func.vmap(grad(log p))` over the examples of a batch (chunked to bound the batch × P buffer)."""

    name = "vmap"

    def __init__(self, model: nn.Module, sums: dict[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        from torch.func import functional_call, grad, vmap

        self.model, self.sums = model, sums
        params = _params(model)
        per_example = sum(p.numel() for p in params.values()) * 4
        self.chunk = max(1, chunk_bytes // max(1, per_example))
        use_keep = _accepts_logits_to_keep(model)

        def logprob_one(weights: dict[str, torch.Tensor], ids: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor, keep: int) -> torch.Tensor:
            kwargs: dict[str, Any] = {"use_cache": False}
            if use_keep:
                kwargs["logits_to_keep"] = keep
            logits = functional_call(model, weights, (ids.unsqueeze(0),), kwargs).logits[0, -keep:-1].float()
            nll = nn.functional.cross_entropy(logits, targets, reduction="none")
            return -(nll * mask).sum()

        self._per_example_grads = lambda w, b: vmap(grad(logprob_one), in_dims=(None, 0, 0, 0, None),
                                                    chunk_size=self.chunk)(w, b.input_ids, b.targets, b.mask, b.keep)

    def accumulate(self, batch: Batch) -> None:
        weights = {n: p.detach() for n, p in _params(self.model).items()}
        with warnings.catch_warnings():
            # CPU flash attention has no vmap batching rule; torch falls back to a loop (correct, just slower).
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads = self._per_example_grads(weights, batch)
        for name, g in grads.items():
            self.sums[name].add_(g.float().square_().sum(0))


def _bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; bf16/fp16 inputs keep their fast kernels and accumulate in fp32 where supported."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return torch.bmm(a.float(), b.float())


class _Contribution:
    """One use of a parameter in the forward pass: adds its per-example gradients (examples `rows`) into `buf`."""

    def __init__(self, kind: str, module: nn.Module, param_attr: str, x: torch.Tensor) -> None:
        self.kind, self.module, self.param_attr, self.x = kind, module, param_attr, x
        self.version = x._version
        self.grad: torch.Tensor | None = None

    def release(self) -> None:
        self.x = self.grad = None  # type: ignore[assignment]

    def _checked(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, d = self.x, self.grad
        if x is None or d is None:
            raise RuntimeError("per-example contribution used after release")
        if x._version != self.version:
            raise UnsupportedModel(f"{type(self.module).__name__}: input modified in place after the forward")
        return x, d

    def _embedding_rows(self, rows: slice, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, gradient row) per token position, key = example × vocab + token id."""
        x, d = self._checked()
        b = rows.stop - rows.start
        ids = x[rows].reshape(b, -1)
        keys = (torch.arange(b, device=ids.device).unsqueeze(1) * vocab + ids).flatten()
        values = d[rows].reshape(keys.numel(), -1).float()
        pad = self.module.padding_idx
        if pad is not None:  # autograd gives the padding row no gradient; neither do we
            keep = ids.flatten() != pad
            keys, values = keys[keep], values[keep]
        return keys, values

    def per_example(self, buf: torch.Tensor | None, rows: slice, backend: HookBackend,
                    shape: tuple[int, ...]) -> torch.Tensor:
        """Add this use's per-example gradients (examples `rows`, fp32) to `buf`; None starts a new buffer."""
        b = rows.stop - rows.start
        if self.kind == "embedding":
            keys, values = self._embedding_rows(rows, shape[0])
            if buf is None:
                buf = torch.zeros((b, *shape), dtype=torch.float32, device=values.device)
            buf.view(b * shape[0], shape[1]).index_add_(0, keys, values)
            return buf
        x, d = self._checked()
        if self.kind == "linear_weight":
            g = _bmm_fp32(d[rows].reshape(b, -1, d.shape[-1]).mT, x[rows].reshape(b, -1, x.shape[-1]))
        elif self.kind == "linear_bias":
            g = d[rows].reshape(b, -1, d.shape[-1]).float().sum(1)
        else:
            g = backend.module_vjp(self.module, self.param_attr, x[rows], d[rows])
        return g if buf is None else buf.add_(g)

    def add_squares(self, acc: torch.Tensor, rows: slice) -> bool:
        """Fast path for an embedding used once: Σ_b g_b² from the rows each example touched, no dense buffer."""
        if self.kind != "embedding":
            return False
        keys, values = self._embedding_rows(rows, acc.shape[0])
        unique, inverse = torch.unique(keys, return_inverse=True)
        per_row = torch.zeros(unique.numel(), acc.shape[1], dtype=torch.float32, device=acc.device)
        per_row.index_add_(0, inverse, values)
        acc.index_add_(0, unique % acc.shape[0], per_row.square_())
        return True


class HookBackend:
    """Per-example gradients from one batched forward/backward; see the module docstring."""

    name = "hooks"

    def __init__(self, model: nn.Module, sums: dict[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.model, self.sums, self.chunk_bytes = model, sums, chunk_bytes
        params = _params(model)
        self.name_of = {id(p): n for n, p in params.items()}
        self.param = params
        self.plan: list[tuple[nn.Module, str]] = []
        for module in model.modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            if type(module) is nn.Linear:
                kind = "linear"
            elif type(module) is nn.Embedding and module.max_norm is None:
                kind = "embedding"
            else:
                kind = "module"
            self.plan.append((module, kind))
        self._recomputing = False
        self._batch_size = 0
        self._pending: dict[str, list[_Contribution]] = {}
        self._expected: dict[str, int] = {}
        self._error: UnsupportedModel | None = None

    # -- hooks
    def _forward_hook(self, kind: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if self._recomputing:
                return None
            try:
                return self._capture(kind, module, args, kwargs, out)
            except UnsupportedModel as e:
                self._error = self._error or e
                return None

        return hook

    def _capture(self, kind: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        b = self._batch_size
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise UnsupportedModel(f"{type(module).__name__}: forward takes more than one tensor")
        # Per-example structure must be visible: (batch, positions, features) activations, (batch, positions) token
        # ids. A 2-D activation (e.g. tokens gathered across the batch for MoE experts) could mix examples.
        if args[0].dim() != (2 if kind == "embedding" else 3) or args[0].shape[0] != b:
            raise UnsupportedModel(f"{type(module).__name__}: input of shape {list(args[0].shape)} hides which "
                                   "example each row belongs to")
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != b:
            raise UnsupportedModel(f"{type(module).__name__}: output is not a (batch, ...) tensor")
        x = args[0].detach()
        if not out.requires_grad:
            # Parameters are frozen in this mode; a module fed by non-differentiable inputs (the embedding) starts
            # the graph here, so its output becomes a leaf whose gradient we can catch.
            out = out.detach().requires_grad_()
        contributions: list[tuple[str, _Contribution]] = []
        for attr, p in module.named_parameters(recurse=False):
            name = self.name_of.get(id(p))
            if name is None:
                continue
            if kind == "linear":
                sub = "linear_weight" if attr == "weight" else "linear_bias"
            elif kind == "embedding":
                sub = "embedding"
            else:
                sub = "module"
            contributions.append((name, _Contribution(sub, module, attr, x)))
            self._expected[name] = self._expected.get(name, 0) + 1

        def on_grad(grad: torch.Tensor) -> None:
            for name, c in contributions:
                c.grad = grad.detach()
                self._pending.setdefault(name, []).append(c)
                if len(self._pending[name]) == self._expected[name]:
                    self._finalize(name)

        out.register_hook(on_grad)
        return out

    def module_vjp(self, module: nn.Module, attr: str, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-example gradient of one module's own parameter: vmap of the module's VJP, recomputing its forward."""
        from torch.func import functional_call, vjp, vmap

        weight = getattr(module, attr).detach()

        def one(x1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
            _, pullback = vjp(lambda w: functional_call(module, {attr: w}, (x1.unsqueeze(0),)), weight)
            return pullback(d1.unsqueeze(0).to(weight.dtype))[0]

        self._recomputing = True
        try:
            with torch.enable_grad():
                return vmap(one)(x, d).float()
        finally:
            self._recomputing = False

    def _finalize(self, name: str) -> None:
        contributions = self._pending.pop(name)
        self._expected.pop(name, None)
        acc = self.sums[name]
        per_example = acc.numel() * 4
        step = max(1, min(self._batch_size, self.chunk_bytes // max(1, per_example)))
        try:
            for start in range(0, self._batch_size, step):
                rows = slice(start, min(self._batch_size, start + step))
                if len(contributions) == 1 and contributions[0].add_squares(acc, rows):
                    continue
                buf = None
                for c in sorted(contributions, key=lambda c: c.kind == "embedding"):  # dense ones start the buffer
                    buf = c.per_example(buf, rows, self, tuple(acc.shape))
                acc += buf.square_().sum(0)
        except UnsupportedModel as e:
            self._error = self._error or e
        finally:
            for c in contributions:
                c.release()

    # -- driver
    def accumulate(self, batch: Batch) -> None:
        self._batch_size = batch.size
        self._pending.clear()
        self._expected.clear()
        self._error = None
        handles = [m.register_forward_hook(self._forward_hook(kind), with_kwargs=True) for m, kind in self.plan]
        try:
            with _requires_grad(self.model, False):
                response_logprob(self.model, batch).sum().backward()
            # A use whose output never reached the loss contributes zero; finish the rest of the parameter.
            for name in list(self._pending):
                self._finalize(name)
        finally:
            for h in handles:
                h.remove()
            self._pending.clear()
            self._expected.clear()
        if self._error is not None:
            raise self._error


BACKENDS: dict[str, type] = {"hooks": HookBackend, "vmap": VmapBackend, "loop": LoopBackend}


def new_sums(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in _params(model).items()}


def _probe_batch(examples: Sequence[Example], device: torch.device, pad_id: int) -> Batch:
    """Two short sequences of different lengths from the data (the second half of each scored)."""
    seqs = [(e.prompt_ids + e.response_ids)[:32] for e in examples[:2]]
    seqs = [s if len(s) >= 2 else [*s, pad_id, pad_id][:2] for s in seqs]
    if len(seqs) == 1:
        seqs.append(seqs[0][: max(2, len(seqs[0]) // 2)])
    if len(seqs[0]) == len(seqs[1]):
        seqs[1] = seqs[1][:-1] if len(seqs[1]) > 2 else [*seqs[1], pad_id]
    return make_batch(seqs, [max(1, len(s) // 2) for s in seqs], device, pad_id)


def hooks_match_loop(model: nn.Module, batch: Batch) -> str | None:
    """Run the hooks backend and the per-example loop on `batch`; None if they agree, else why not."""
    want, got = new_sums(model), new_sums(model)
    LoopBackend(model, want).accumulate(batch)
    try:
        HookBackend(model, got).accumulate(batch)
    except UnsupportedModel as e:
        return str(e)
    # A plumbing error (examples mixed, a use missed) is off by O(1); bf16/fp16 rounding by a few percent at most.
    low_precision = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    rtol = 1e-1 if low_precision else 1e-3
    for name in want:
        scale = float(want[name].abs().max())
        err = float((got[name] - want[name]).abs().max())
        if err > rtol * scale + 1e-12:
            return f"{name}: hooks and loop differ by {err:.3g} (scale {scale:.3g})"
    return None


def choose_backend(model: nn.Module, requested: PerExample, examples: Sequence[Example], *, device: torch.device,
                   pad_id: int, gradient_checkpointing: bool) -> str:
    if gradient_checkpointing:
        if requested not in ("auto", "loop"):
            raise SarmergeError(f"--gradient-checkpointing needs --per-example loop (got {requested!r})")
        return "loop"
    if requested in ("auto", "hooks"):
        problem = hooks_match_loop(model, _probe_batch(examples, device, pad_id))
        if problem is None:
            return "hooks"
        if requested == "hooks":
            raise SarmergeError(f"--per-example hooks does not fit this model: {problem}; use auto or loop")
        log.warning("per-example hooks do not fit this model (%s); using the per-example loop", problem)
        return "loop"
    return requested


def enable_gradient_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Turn on HF activation checkpointing (non-reentrant); returns the layers that `_layers_training` flips."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        enable()
    except ValueError as e:
        raise SarmergeError(f"{type(model).__name__}: {e}; drop --gradient-checkpointing") from e
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise SarmergeError(f"{type(model).__name__} has no checkpointable layers; drop --gradient-checkpointing")
    model.eval()
    return layers
