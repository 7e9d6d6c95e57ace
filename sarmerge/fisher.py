"""Diagonal Fisher information of a causal LM (SPEC §5): `sarmerge fisher`.

F[j] = E_x E_y[(∂ log p_θ(y|x) / ∂θ_j)²], log p summed over the response tokens only. The square is taken per
example, never of a batch gradient (that is a different, biased quantity), and summed in fp32 whatever the weights'
dtype. `sampled` draws y from the model itself at temperature 1 (the true Fisher); `empirical` uses the reference.

Three ways to get per-example squared gradients, all exact and cross-checked in the tests:

- `hooks` (default): one batched forward and backward. Forward hooks keep each layer's input x_b, tensor hooks catch
  the gradient δ_b of its output, and the per-example weight gradient is rebuilt as δ_bᵀx_b (a batched matmul with the
  FLOPs of the ordinary weight gradient, which is skipped), squared and summed over the batch at once. Embeddings
  scatter δ into the rows each example used; any other module with its own parameters (RMSNorm, ...) gets the
  per-example vector-Jacobian product of just that module, re-run under `torch.func.vmap`. A parameter used twice
  (tied embedding and LM head) collects both contributions per example before squaring. Sequences are right-padded
  and run without an attention mask: the model is causal, so padding after a sequence cannot change it, and exactly
  zero gradient flows from the padded positions.
- `vmap`: `torch.func.vmap(grad(...))` over the examples of a batch; generic but materialises batch × parameters.
- `loop`: one forward and backward per example. The reference, and the path for `--gradient-checkpointing`.

`auto` uses `hooks` after a probe on two short sequences confirms it matches `loop` for this model, else `loop`.
Partial sums are saved every K examples next to the output; `--resume` continues from them and reproduces the
uninterrupted result bit for bit (same batch size, device and dtype). Sampled responses use one random stream per
example (seed, example index), so they do not depend on batching or on where a run was resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from sarmerge import __version__
from sarmerge.checkpoint import FLOAT_CODES, Checkpoint, atomic_output_dir, sha256_file
from sarmerge.errors import SarmergeError
from sarmerge.fisher_store import FisherStore, save_fisher

log = logging.getLogger(__name__)

Mode = Literal["sampled", "empirical"]
PerExample = Literal["auto", "hooks", "vmap", "loop"]
DATA_DIR = Path(__file__).parent / "data"
SHIPPED_DATA = {"math": DATA_DIR / "calib_math.jsonl", "code": DATA_DIR / "calib_code.jsonl"}
META_PREFIX = "sarmerge.fisher."
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Per-example gradient buffers are built in slices of the batch no larger than this, so memory stays bounded for
# large parameters (a 150k × 1.5k embedding is 0.9 GB per example in fp32).
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024
STATE_FILE = "state.json"


# --------------------------------------------------------------------------------------------------------- data ---


@dataclass(frozen=True)
class CalibrationRecord:
    """One line of a calibration JSONL file."""

    line: int
    prompt: str
    response: str | None


def resolve_data(data: str | os.PathLike[str]) -> Path:
    """A path, or `math` / `code` for the shipped calibration sets (used when no such file exists)."""
    path = Path(data)
    if not path.exists() and str(data) in SHIPPED_DATA:
        return SHIPPED_DATA[str(data)]
    return path


def read_calibration(path: Path, mode: Mode) -> list[CalibrationRecord]:
    """Parse and validate a calibration JSONL; every error names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SarmergeError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SarmergeError(f"{path}: cannot read calibration file: {e}") from e
    records = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SarmergeError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise SarmergeError(f"{where}: expected a JSON object with a 'prompt' field, got {type(row).__name__}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            got = "missing" if prompt is None else f"got {prompt!r}"
            raise SarmergeError(f"{where}: field 'prompt' must be a non-empty string ({got})")
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise SarmergeError(f"{where}: field 'response' must be a string, got {type(response).__name__}")
        if mode == "empirical" and response is None:
            raise SarmergeError(f"{where}: field 'response' is missing; --mode empirical needs a reference response")
        records.append(CalibrationRecord(number, prompt, response))
    if not records:
        raise SarmergeError(f"{path}: no examples (the file is empty)")
    return records


@dataclass
class Example:
    """A tokenized calibration example; `index` is its position in the run (it seeds its sampled response)."""

    index: int
    line: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_limit: int = 0  # sampled mode: most tokens to draw
    truncated: bool = False  # empirical mode: the reference was cut to fit the context


def context_length(config: dict[str, Any]) -> int | None:
    """The model's maximum sequence length, from its config.json (the text part of a multimodal one)."""
    text_config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = text_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The model's chat template with the generation prompt when it has one, else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def build_examples(records: Sequence[CalibrationRecord], tokenizer: Any, *, mode: Mode, n_examples: int | None,
                   context: int | None, max_new_tokens: int, eos_id: int | None, source: str) -> list[Example]:
    """Tokenize and check every record, then lay out the run: the first N in file order (sampled mode cycles the
    prompts when N exceeds the file, each repetition with its own sample)."""
    n = len(records) if n_examples is None else n_examples
    if mode == "empirical" and n > len(records):
        raise SarmergeError(f"{source}: --examples {n} but the file has only {len(records)} examples "
                            "(empirical mode uses each reference response once)")
    encoded = []
    for r in records:
        ids = encode_prompt(tokenizer, r.prompt)
        if not ids:
            raise SarmergeError(f"{source}:{r.line}: prompt encodes to no tokens")
        if context is not None and len(ids) >= context:
            raise SarmergeError(f"{source}:{r.line}: prompt is {len(ids)} tokens, longer than the model's context "
                                f"of {context} tokens (it must leave room for at least one response token)")
        response = None
        if mode == "empirical":
            response = list(tokenizer(r.response, add_special_tokens=False)["input_ids"])
            if eos_id is not None:
                response.append(eos_id)  # the reference ends where the model should stop
            if not response:
                raise SarmergeError(f"{source}:{r.line}: response encodes to no tokens and the model has no EOS token")
        encoded.append((r.line, ids, response))
    examples = []
    for i in range(n):
        line, ids, response = encoded[i % len(encoded)]
        room = context - len(ids) if context is not None else None
        if response is not None:
            cut = room is not None and len(response) > room
            examples.append(Example(i, line, ids, response[:room] if cut else response, truncated=cut))
        else:
            examples.append(Example(i, line, ids, response_limit=min(max_new_tokens, room or max_new_tokens)))
    return examples


# ------------------------------------------------------------------------------------------------------ batches ---


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


# ------------------------------------------------------------------------------------------------------ sampling ---


def example_seed(seed: int, index: int) -> int:
    """The random stream of one example: independent of batching and of where a run resumed."""
    return int.from_bytes(hashlib.sha256(f"sarmerge-fisher:{seed}:{index}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def sample_responses(model: nn.Module, examples: Sequence[Example], *, seed: int, max_new_tokens: int,
                     eos_ids: set[int], pad_id: int, device: torch.device) -> list[list[int]]:
    """Draw one response per example from the model at temperature 1 over its full vocabulary (no top-k/top-p),
    with KV cache and left padding; stops at an EOS (kept in the response) or the example's token limit."""
    bsz = len(examples)
    width = max(len(e.prompt_ids) for e in examples)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    attention = torch.zeros(bsz, width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, width - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
        attention[i, width - len(e.prompt_ids) :] = 1
    # Inverse-CDF sampling with each example's own uniforms: the same draws whatever the batch composition.
    uniforms = torch.stack([
        torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(example_seed(seed, e.index)),
                   dtype=torch.float64)
        for e in examples
    ]).to(device)
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp_(min=0)
    first = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **first)
    responses: list[list[int]] = [[] for _ in examples]
    done = [e.response_limit <= 0 for e in examples]
    for step in range(max(e.response_limit for e in examples)):
        cdf = torch.softmax(out.logits[:, -1].float(), dim=-1).double().cumsum(-1)
        draw = (uniforms[:, step] * cdf[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, draw).squeeze(-1).clamp_(max=cdf.shape[-1] - 1).tolist()
        for i, e in enumerate(examples):
            if not done[i]:
                responses[i].append(tokens[i])
                done[i] = tokens[i] in eos_ids or len(responses[i]) >= e.response_limit
        if all(done):
            break
        feed = torch.tensor([[t if not d else pad_id] for t, d in zip(tokens, done, strict=True)], device=device)
        attention = torch.cat([attention, attention.new_ones(bsz, 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=feed, attention_mask=attention, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return responses


# ------------------------------------------------------------------------------- per-example squared gradients ---


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


# ------------------------------------------------------------------------------------------------- estimation ---


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


# ------------------------------------------------------------------------------------------- memory estimate ---


def estimate_memory(model: nn.Module, *, batch_size: int, seq_len: int, keep: int, backend: str,
                    gradient_checkpointing: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, int]:
    """Rough peak bytes by component (activations after Korthikanti et al. 2022, flash attention)."""
    params = _params(model)
    p0 = next(iter(params.values()))
    elem = p0.element_size()
    n_params = sum(p.numel() for p in params.values())
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(text, "hidden_size", 0) or 0
    layers = getattr(text, "num_hidden_layers", 0) or 0
    vocab = getattr(text, "vocab_size", 0) or 0
    rows = 1 if backend == "loop" else batch_size
    per_token_layer = 34 * hidden * elem // 2  # 34·h bytes per token per layer at 2-byte activations
    if gradient_checkpointing:
        activations = rows * seq_len * (layers * hidden * elem + per_token_layer)
    else:
        activations = rows * seq_len * layers * per_token_layer
    logits = rows * keep * vocab * (elem + 4 + 4)  # logits, fp32 log-softmax and its gradient
    largest = max(p.numel() for p in params.values()) * 4
    if backend == "vmap":
        per_example = min(batch_size, max(1, chunk_bytes // max(1, n_params * 4))) * n_params * 4
    elif backend == "hooks":
        per_example = min(batch_size * largest, max(largest, chunk_bytes))
    else:
        per_example = n_params * elem  # .grad
    return {"weights": n_params * elem, "fisher_sums": n_params * 4, "activations": activations, "logits": logits,
            "per_example_gradients": per_example}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------------- run (CLI level) ---


def model_sha256(files: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """sha256 of the weights: the file's own digest for one file; for shards, of their `sha256sum`-style listing."""
    digests = {f.name: sha256_file(f) for f in files}
    if len(digests) == 1:
        return next(iter(digests.values())), digests
    listing = "".join(f"{d}  {n}\n" for n, d in sorted(digests.items()))
    return hashlib.sha256(listing.encode()).hexdigest(), digests


def _default_dtype(device: torch.device) -> str:
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def stop_tokens(ckpt: Checkpoint, tokenizer: Any) -> list[int]:
    """End-of-response ids: generation_config.json's `eos_token_id` (int or list; a chat model's end-of-turn), then
    the tokenizer's EOS. The first one ends empirical references."""
    ids: list[int] = []
    gen_file = ckpt.path / "generation_config.json"
    gen = {}
    if ckpt.path.is_dir() and gen_file.is_file():
        try:
            gen = json.loads(gen_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SarmergeError(f"{gen_file}: invalid JSON: {e}") from e
    config_eos = ckpt.config.get("eos_token_id")
    for source in (gen.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None), config_eos):
        for token in source if isinstance(source, list) else [source]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def checkpoint_names(model: nn.Module, ckpt: Checkpoint) -> dict[str, str | None]:
    """Checkpoint float tensor name → canonical parameter name (None for a float buffer, whose Fisher is zero)."""
    canonical = {id(p): n for n, p in _params(model).items()}
    every = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    mapping: dict[str, str | None] = {}
    prefix = getattr(model, "base_model_prefix", "")
    for name, info in ckpt.tensors.items():
        if info.dtype not in FLOAT_CODES:
            continue
        # Some checkpoints store the base model's names without its prefix (`h.0...` for `transformer.h.0...`).
        p = every.get(name, every.get(f"{prefix}.{name}") if prefix else None)
        if p is None:
            if name in buffers or f"{prefix}.{name}" in buffers:
                mapping[name] = None
                continue
            raise SarmergeError(f"{info.file}: tensor {name!r} is not a parameter of the loaded "
                                f"{type(model).__name__} (its Fisher cannot be computed)")
        if tuple(p.shape) != info.shape:
            raise SarmergeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)} but the loaded model's "
                                f"parameter has {list(p.shape)}")
        mapping[name] = canonical[id(p)]
    return mapping


def state_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.fisher-state"


def _save_state(state_dir: Path, sums: FisherSums, fingerprint: dict[str, Any]) -> None:
    """Write partial sums, then commit them by atomically replacing state.json (the only commit point)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sub = f"sums-{sums.examples:09d}"
    target = state_dir / sub
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    save_fisher(target, sums.sums, {"sarmerge.fisher.partial": "true"})
    record = {"fingerprint": fingerprint, "examples": sums.examples, "response_tokens": sums.response_tokens,
              "total_tokens": sums.total_tokens, "sums": sub}
    tmp = state_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, state_dir / STATE_FILE)
    for old in state_dir.glob("sums-*"):
        if old.name != sub:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(state_dir: Path, fingerprint: dict[str, Any], model: nn.Module) -> FisherSums | None:
    f = state_dir / STATE_FILE
    if not f.exists():
        return None
    try:
        record = json.loads(f.read_text())
        saved = record["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SarmergeError(f"{f}: unreadable resume state ({e}); delete {state_dir} to start over") from e
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise SarmergeError(f"{f}: cannot resume: {key} was {saved.get(key)!r}, now {value!r} "
                                f"(rerun with the same settings, or delete {state_dir} to start over)")
    store = FisherStore(state_dir / record["sums"])
    try:
        sums = {}
        for name, p in _params(model).items():
            if name not in store.ckpt.tensors:
                raise SarmergeError(f"{store.path}: resume state lacks tensor {name!r}")
            sums[name] = store.ckpt.read(name).to(p.device, torch.float32)
    finally:
        store.close()
    return FisherSums(sums, record["examples"], record["response_tokens"], record["total_tokens"])


def run_fisher(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    mode: Mode = "sampled",
    examples: int | None = None,
    support_of: str | Path | None = None,
    epsilon: float = 1e-5,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    seed: int = 0,
    per_example: PerExample = "auto",
    gradient_checkpointing: bool = False,
    checkpoint_every: int = 64,
    resume: bool = False,
    state_dir: str | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    shard_size: str = "5GB",
    progress: bool = True,
    on_batch: Callable[[FisherSums], None] | None = None,
) -> dict[str, Any]:
    """Compute a checkpoint's diagonal Fisher on a calibration JSONL and write a Fisher store to `out` atomically.

    Returns the manifest (also written to `out/fisher_manifest.json`).
    """
    t0 = time.perf_counter()
    if mode not in ("sampled", "empirical"):
        raise SarmergeError(f"--mode must be sampled or empirical, got {mode!r}")
    for flag, value, low in (("--batch-size", batch_size, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--checkpoint-every", checkpoint_every, 0)):
        if value < low:
            raise SarmergeError(f"{flag} must be at least {low}, got {value}")
    if examples is not None and examples < 1:
        raise SarmergeError(f"--examples must be at least 1, got {examples}")
    if not epsilon >= 0:
        raise SarmergeError(f"--epsilon must be >= 0, got {epsilon}")
    if dtype != "auto" and dtype not in TORCH_DTYPES:
        raise SarmergeError(f"--dtype must be auto or one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SarmergeError(f"--device {device}: CUDA is not available on this machine")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SarmergeError(f"{out}: output already exists (pass --overwrite to replace it)")
    state_path = Path(state_dir) if state_dir else state_dir_for(out)

    data_path = resolve_data(data)
    records = read_calibration(data_path, mode)
    ckpt = Checkpoint(model_dir)
    base = Checkpoint(support_of) if support_of is not None else None
    try:
        if base is not None:
            for name, info in ckpt.tensors.items():
                other = base.tensors.get(name)
                if info.dtype in FLOAT_CODES and (other is None or other.shape != info.shape):
                    what = "lacks it" if other is None else f"has shape {list(other.shape)}"
                    raise SarmergeError(f"{base.path}: --support-of base {what} for tensor {name!r} "
                                        f"({list(info.shape)} in {info.file})")
        with ThreadPoolExecutor(1) as hasher:
            model_hash = hasher.submit(model_sha256, ckpt.files)
            data_hash = sha256_file(data_path)
            from sarmerge.zoo.tiny import load_tokenizer

            try:
                tokenizer = load_tokenizer(ckpt.path)
            except (OSError, ValueError) as e:
                raise SarmergeError(f"{ckpt.path}: cannot load the tokenizer: {e}") from e
            stops = stop_tokens(ckpt, tokenizer)
            eos = stops[0] if stops else None
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
            # Every record is checked against the context before the model is loaded.
            todo = build_examples(records, tokenizer, mode=mode, n_examples=examples,
                                  context=context_length(ckpt.config), max_new_tokens=max_new_tokens, eos_id=eos,
                                  source=str(data_path))
            model = _load_model(ckpt.path, dev, dtype)
            names = checkpoint_names(model, ckpt)
            model_digest, file_digests = model_hash.result()

        compute_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        fingerprint = {"model_sha256": model_digest, "data_sha256": data_hash, "mode": mode, "examples": len(todo),
                       "seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                       "dtype": compute_dtype}
        start = None
        if resume:
            start = _load_state(state_path, fingerprint, model)
            if start is None:
                log.warning("--resume: no saved state in %s; starting from the beginning", state_path)
            else:
                log.info("resuming from %d/%d examples saved in %s", start.examples, len(todo), state_path)
        elif (state_path / STATE_FILE).exists():
            log.warning("discarding the partial state in %s (pass --resume to continue from it)", state_path)
            shutil.rmtree(state_path, ignore_errors=True)

        longest = max(len(e.prompt_ids) + max(len(e.response_ids), e.response_limit) for e in todo)
        shortest_prompt = min(len(e.prompt_ids) for e in todo)
        backend_guess = "loop" if gradient_checkpointing else ("hooks" if per_example == "auto" else per_example)
        memory = estimate_memory(model, batch_size=batch_size, seq_len=longest, keep=longest - shortest_prompt + 1,
                                 backend=backend_guess, gradient_checkpointing=gradient_checkpointing)
        total = sum(memory.values())
        log.info("memory estimate on %s: %s ≈ %s", dev, ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in memory.items()),
                 _fmt_bytes(total))
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            if total > free:
                log.warning("estimated %s exceeds the %s free on %s: lower --batch-size, or use "
                            "--gradient-checkpointing", _fmt_bytes(total), _fmt_bytes(free), dev)
        log.info("fisher %s on %d examples from %s (batch %d, %s, seed %d); partial sums every %d examples in %s",
                 mode, len(todo), data_path, batch_size, compute_dtype, seed, checkpoint_every, state_path)

        resumed_from = start.examples if start is not None else 0
        t_compute = time.perf_counter()
        saved = [resumed_from]

        def save_state(partial: FisherSums) -> None:
            _save_state(state_path, partial, fingerprint)
            saved[0] = partial.examples

        try:
            result = estimate_fisher(
                model, todo, mode=mode, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                eos_ids=set(stops), pad_id=pad_id, per_example=per_example,
                gradient_checkpointing=gradient_checkpointing, start=start, checkpoint_every=checkpoint_every,
                on_checkpoint=save_state if checkpoint_every else None, on_batch=on_batch, progress=progress,
            )
        except KeyboardInterrupt:
            if saved[0]:
                log.warning("interrupted; partial sums for %d/%d examples are in %s: rerun with --resume to "
                            "continue", saved[0], len(todo), state_path)
            raise
        t_compute = time.perf_counter() - t_compute
        fisher = result.fisher()
        by_ckpt = {
            name: fisher[canon].cpu() if canon is not None
            else torch.zeros(ckpt.tensors[name].shape, dtype=torch.float32)
            for name, canon in names.items()
        }
        taus = None
        if base is not None:
            taus = {name: ckpt.read(name).to(torch.float32) - base.read(name).to(torch.float32) for name in by_ckpt}
        dense_bytes = sum(t.numel() * 4 for t in by_ckpt.values())
        metadata = {
            "mode": mode, "examples": result.examples, "tokens": result.response_tokens,
            "total_tokens": result.total_tokens, "data_sha256": data_hash, "data_file": str(data_path),
            "model_sha256": model_digest, "model": str(ckpt.path), "seed": seed, "dtype": compute_dtype,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens if mode == "sampled" else "",
            "per_example": result.backend, "device": str(dev), "sarmerge_version": __version__,
        }
        if base is not None:
            metadata["support_of"] = str(base.path)
            metadata["support_of_sha256"] = model_sha256(base.files)[0]
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            stored = save_fisher(tmp, by_ckpt, {META_PREFIX + k: str(v) for k, v in metadata.items()},
                                 support_taus=taus, epsilon=epsilon, shard_size=shard_size)
            manifest = {
                **metadata,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "layout": "support" if taus is not None else "dense",
                "epsilon": epsilon,
                "model_files": file_digests,
                "stored_bytes": stored,
                "dense_bytes": dense_bytes,
                "size_fraction": stored / dense_bytes if dense_bytes else 1.0,
                "resumed_from": resumed_from,
                "truncated_responses": sum(e.truncated for e in todo),
                "timings_s": {"compute": round(t_compute, 3), "total": round(time.perf_counter() - t0, 3)},
                "throughput": {"examples_per_s": round((result.examples - resumed_from) / max(t_compute, 1e-9), 3)},
            }
            (tmp / "fisher_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(state_path, ignore_errors=True)
    finally:
        ckpt.close()
        if base is not None:
            base.close()
    return manifest


def _load_model(path: Path, device: torch.device, dtype: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch_dtype = TORCH_DTYPES[_default_dtype(device) if dtype == "auto" else dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise SarmergeError(f"{path}: cannot load as a causal LM: {e}") from e
    return model.to(device).eval()


# -------------------------------------------------------------------------------------------------------- CLI ---


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fisher", help="diagonal Fisher information of a causal LM on calibration prompts",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (HF layout, safetensors)")
    p.add_argument("--data", required=True,
                   help="calibration JSONL ({'prompt': ..., 'response'?: ...} per line), or `math` / `code` for the "
                        "shipped GSM8K / HumanEval sets")
    p.add_argument("--out", required=True, type=Path, help="output Fisher store directory (created atomically)")
    p.add_argument("--mode", choices=["sampled", "empirical"], default="sampled",
                   help="sampled: responses drawn from the model (true Fisher, default); empirical: the references")
    p.add_argument("--examples", type=int, default=None,
                   help="number of examples (default: every line; sampled mode cycles the prompts beyond that)")
    p.add_argument("--support-of", type=Path, default=None, metavar="BASE",
                   help="store Fisher only where the model differs from BASE by more than --epsilon (for sar)")
    p.add_argument("--epsilon", type=float, default=1e-5, help="support threshold on |θ − θ_base| (default 1e-5)")
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *TORCH_DTYPES],
                   help="weights' compute dtype (default: bfloat16 on CUDA, float32 on CPU); sums are always fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256, help="sampled response length limit (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-example", choices=["auto", "hooks", "vmap", "loop"], default="auto",
                   help="how per-example gradients are computed (default auto: hooks when verified, else loop)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass (less memory, per-example loop)")
    p.add_argument("--checkpoint-every", type=int, default=64, metavar="K",
                   help="save partial sums every K examples for --resume (0 = never; default 64)")
    p.add_argument("--resume", action="store_true", help="continue from the partial sums of an interrupted run")
    p.add_argument("--state-dir", type=Path, default=None, help="where partial sums live (default OUT.fisher-state)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--shard-size", default="5GB", help="max bytes per output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    m = run_fisher(
        args.model, args.data, args.out, mode=args.mode, examples=args.examples, support_of=args.support_of,
        epsilon=args.epsilon, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, per_example=args.per_example,
        gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
        resume=args.resume, state_dir=args.state_dir, overwrite=args.overwrite, threads=args.threads,
        shard_size=args.shard_size, progress=not args.no_progress,
    )
    size = f"{_fmt_bytes(m['stored_bytes'])}"
    if m["layout"] == "support":
        size += f" on the update support = {100 * m['size_fraction']:.1f}% of the dense {_fmt_bytes(m['dense_bytes'])}"
    print(f"fisher ({m['mode']}, {m['examples']} examples, {m['tokens']} response tokens, per-example "
          f"{m['per_example']}) written to {args.out}: {size}; {m['throughput']['examples_per_s']:.2f} examples/s")
    return 0
