"""Checkpoints that register themselves: a `transformers.TrainerCallback` for the sarmerge pipeline (SPEC §8).

Works with any `transformers.Trainer`, TRL's trainers (`GRPOTrainer`, …) included, since they subclass it:

    from tasks.trainer_callback import SarmergeRegisterCallback
    callback = SarmergeRegisterCallback(name="smol-math", domain="math", base="models:/smol-base/1")
    trainer = GRPOTrainer(..., callbacks=[callback])

Each checkpoint the Trainer saves (`checkpoints="every"`) or only the last one (`checkpoints="final"`, the default)
goes through `tasks.register.register_checkpoint`, the same path as `sarmerge register`: plain safetensors artifacts
plus the `sarmerge.kind/domain/base/sha256` tags, and the optional calibration JSONL (`calib`) the pipeline's Fisher
step uses. A new RLVR version is what starts the merge DAG, so the run uploads straight into the pipeline.

The callback lives here, in the pipeline layer, because it needs MLflow; `sarmerge/` stays MLflow-free. Only the main
process registers (multi-GPU runs save once). A registration error stops the run by default (`on_error="raise"`): a
run that silently failed to upload would leave the pipeline waiting for nothing. The checkpoint stays on disk either
way and `sarmerge register DIR ...` uploads it later.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sarmerge.errors import SarmergeError

log = logging.getLogger(__name__)
FINAL_DIR = "sarmerge-final"


class SarmergeRegisterCallback(TrainerCallback):
    """Register saved checkpoints in the MLflow Model Registry with the sarmerge tags.

    name: registered model name (one version per checkpoint); domain: skill domain (`math`, `code`, …);
    base: the model training started from, `models:/NAME/VERSION` (or `@ALIAS`), or its directory together with
    `base_name` (registered as the base on first use); calib: calibration JSONL of this domain (optional);
    checkpoints: `final` (only the end of training) or `every` (each save); tracking_uri: MLflow server (default
    $MLFLOW_TRACKING_URI); save_dtype: register a copy of the weights in this dtype (`bfloat16` for RLVR-like sparse
    checkpoints from fp32 master weights; written to `sarmerge-<dtype>/` inside the checkpoint) instead of the
    Trainer's files; on_error: `raise` (stop the run) or `log` (warn and go on).

    `registered` lists what was registered: dicts with step, path, uri, created (False when the same content was
    already in the registry, e.g. the final model equal to the last checkpoint).
    """

    def __init__(self, *, name: str, domain: str, base: str, base_name: str | None = None,
                 calib: str | Path | None = None, checkpoints: Literal["final", "every"] = "final",
                 tracking_uri: str | None = None, description: str | None = None,
                 save_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
                 on_error: Literal["raise", "log"] = "raise") -> None:
        from tasks import registry as reg

        if checkpoints not in ("final", "every"):
            raise SarmergeError(f"SarmergeRegisterCallback: checkpoints={checkpoints!r}; use 'final' or 'every'")
        if save_dtype not in (None, "bfloat16", "float16", "float32"):
            raise SarmergeError(f"SarmergeRegisterCallback: save_dtype={save_dtype!r}; use bfloat16, float16, "
                                "float32 or None (as the Trainer saved it)")
        if on_error not in ("raise", "log"):
            raise SarmergeError(f"SarmergeRegisterCallback: on_error={on_error!r}; use 'raise' or 'log'")
        if not base:
            raise SarmergeError("SarmergeRegisterCallback: base is required (models:/NAME/VERSION of the model "
                                "training started from, or its directory with base_name)")
        # fail at construction, not after hours of training
        self.name = reg.validate_name(name)
        self.domain = reg.validate_domain(domain)
        calib_path = Path(calib) if calib is not None else None
        if calib_path is not None and (not calib_path.is_file() or calib_path.stat().st_size == 0):
            raise SarmergeError(f"SarmergeRegisterCallback: calib {calib_path} is not a non-empty file")
        self.base, self.base_name, self.calib = base, base_name, calib_path
        self.checkpoints, self.tracking_uri, self.description, self.on_error = (checkpoints, tracking_uri,
                                                                                description, on_error)
        self.save_dtype = save_dtype
        self.registered: list[dict[str, Any]] = []
        self._last_saved: tuple[int, Path] | None = None

    # -- Trainer hooks --------------------------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"  # transformers' PREFIX_CHECKPOINT_DIR
        if not path.is_dir():
            log.warning("on_save at step %d: %s does not exist; not registered", state.global_step, path)
            return
        self._last_saved = (state.global_step, path)
        if self.checkpoints == "every":
            self._register(self._cast_dir(kwargs, path), state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.checkpoints != "final":
            return
        if self._last_saved is not None and self._last_saved[0] == state.global_step:
            # the Trainer saved at the last step: that checkpoint is the final model
            path = self._cast_dir(kwargs, self._last_saved[1])
        else:
            path = self._save_final(args, state, kwargs)
        self._register(path, state.global_step)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _save_final(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> Path:
        """The model as it ends training, saved as safetensors with its tokenizer (no optimizer state)."""
        path = self._save_cast(kwargs, Path(args.output_dir) / FINAL_DIR)
        log.info("final model of step %d saved to %s", state.global_step, path)
        return path

    def _cast_dir(self, kwargs: dict[str, Any], checkpoint: Path) -> Path:
        """The directory to register for a Trainer checkpoint: itself, or its `save_dtype` copy."""
        if self.save_dtype is None:
            return checkpoint
        return self._save_cast(kwargs, checkpoint / f"sarmerge-{self.save_dtype}")

    def _save_cast(self, kwargs: dict[str, Any], path: Path) -> Path:
        """Save the live model (cast to `save_dtype` when set) and its tokenizer into `path`.

        Why cast: trainers keep fp32 master weights, so their checkpoints are dense; RLVR checkpoints are compared and
        merged in bf16, where the many sub-half-ulp updates vanish (the sparsity SAR-style merges rely on).
        """
        import json

        import torch

        model = kwargs.get("model")
        if model is None:
            raise SarmergeError("SarmergeRegisterCallback: the Trainer passed no model to the callback")
        model = getattr(model, "module", model)  # unwrap DDP/accelerate wrappers
        state_dict = None
        if self.save_dtype is not None:
            dtype = getattr(torch, self.save_dtype)
            cast: dict[int, torch.Tensor] = {}  # keyed by storage, so tied weights stay one tensor
            state_dict = {k: cast.setdefault(v.data_ptr(), v.detach().to("cpu", dtype) if v.is_floating_point()
                                             else v.detach().cpu()) for k, v in model.state_dict().items()}
        model.save_pretrained(path, state_dict=state_dict)  # safetensors by default
        if self.save_dtype is not None:
            config_file = path / "config.json"
            config = json.loads(config_file.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = self.save_dtype
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    def _register(self, path: Path, step: int) -> None:
        from tasks.register import register_checkpoint

        try:
            ref, created = register_checkpoint(path, name=self.name, domain=self.domain, kind="rlvr", base=self.base,
                                               base_name=self.base_name, calib=self.calib,
                                               description=self.description, tracking_uri=self.tracking_uri)
        except Exception as e:
            message = (f"registering {path} (step {step}) as {self.name} failed: {e}; the checkpoint is on disk: "
                       f"upload it with `sarmerge register {path} --name {self.name} --domain {self.domain} "
                       f"--base {self.base}`")
            if self.on_error == "raise":
                raise SarmergeError(message) from e
            log.error("%s", message)
            return
        self.registered.append({"step": step, "path": str(path), "uri": ref.uri, "version": ref.version,
                                "created": created})
        log.info("step %d: %s %s", step, "registered" if created else "already registered as", ref.uri)
