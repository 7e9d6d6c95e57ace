"""Diagonal Fisher information of a causal LM (SPEC §5): `sarmerge fisher`.

F[j] = E_x E_y[(∂ log p_θ(y|x) / ∂θ_j)²], log p summed over the response tokens only. The square is taken per
example, never of a batch gradient (that is a different, biased quantity), and summed in fp32 whatever the weights'
dtype. `sampled` draws y from the model itself at temperature 1 (the true Fisher); `empirical` uses the reference.

The package follows the run: `data` (calibration JSONL → examples), `batches` (padding, response log-likelihood),
`sampling` (the model's own responses), `per_example` (squared per-example gradients), `estimate` (the loop),
`memory` (the peak estimate), `run` (`run_fisher`: checks, resume state, the store) and `cli`. Every name is
re-exported here, so `from sarmerge.fisher import X` works whatever submodule X lives in.

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

from sarmerge.fisher.batches import Batch, _accepts_logits_to_keep, examples_batch, make_batch, response_logprob
from sarmerge.fisher.cli import add_command
from sarmerge.fisher.data import (
    DATA_DIR,
    SHIPPED_DATA,
    CalibrationRecord,
    Example,
    Mode,
    build_examples,
    context_length,
    read_calibration,
    resolve_data,
)
from sarmerge.fisher.estimate import FisherSums, estimate_fisher, processing_order
from sarmerge.fisher.memory import _fmt_bytes, estimate_memory
from sarmerge.fisher.per_example import (
    BACKENDS,
    DEFAULT_CHUNK_BYTES,
    HookBackend,
    LoopBackend,
    PerExample,
    UnsupportedModel,
    VmapBackend,
    _params,
    _probe_batch,
    choose_backend,
    enable_gradient_checkpointing,
    hooks_match_loop,
    new_sums,
)
from sarmerge.fisher.run import (
    META_PREFIX,
    STATE_FILE,
    TORCH_DTYPES,
    checkpoint_names,
    model_sha256,
    run_fisher,
    state_dir_for,
    stop_tokens,
)
from sarmerge.fisher.sampling import example_seed, sample_responses
from sarmerge.hf import encode_prompt

__all__ = [
    "BACKENDS", "DATA_DIR", "DEFAULT_CHUNK_BYTES", "META_PREFIX", "SHIPPED_DATA", "STATE_FILE", "TORCH_DTYPES",
    "Batch", "CalibrationRecord", "Example", "FisherSums", "HookBackend", "LoopBackend", "Mode", "PerExample",
    "UnsupportedModel", "VmapBackend", "_accepts_logits_to_keep", "_fmt_bytes", "_params", "_probe_batch",
    "add_command", "build_examples", "checkpoint_names", "choose_backend", "context_length",
    "enable_gradient_checkpointing", "encode_prompt", "estimate_fisher", "estimate_memory", "example_seed",
    "examples_batch", "hooks_match_loop", "make_batch", "model_sha256", "new_sums", "processing_order",
    "read_calibration", "resolve_data", "response_logprob", "run_fisher", "sample_responses", "state_dir_for",
    "stop_tokens",
]
