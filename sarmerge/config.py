"""The merge config schema (SPEC §4 end), validated before any tensor is read."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sarmerge.errors import SarmergeError
from sarmerge.methods import MergeMethod, Params, get_method
from sarmerge.options import describe_errors

DType = Literal["float32", "float64", "bfloat16", "float16"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="path to a checkpoint directory (HF layout)")
    weight: float = 1.0
    density: float | None = Field(None, gt=0, le=1, description="per-model density for ties/dare/della/breadcrumbs")
    fisher: str | None = Field(None, description="path to this model's Fisher store (sarmerge fisher --out)")


class TensorOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="regex searched in the tensor name; the first matching override wins")
    parameters: dict[str, Any]

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from e
        return v


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    overrides: list[TensorOverride] = Field(default_factory=list)
    dtype: DType = Field("float32", description="compute dtype")
    out_dtype: DType | None = Field(None, description="output dtype; default: each tensor's input dtype")
    seed: int = 0
    tokenizer: str | None = Field(
        None, description="checkpoint whose config/tokenizer files are copied (default: base)"
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        try:
            get_method(v)
        except SarmergeError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _fits_method(self) -> MergeConfig:
        m = self.spec
        if m.needs_base and not self.base_model:
            raise ValueError(f"method {m.name!r} needs base_model")
        n = len(self.models)
        if n < m.min_models or (m.max_models is not None and n > m.max_models):
            want = f"exactly {m.min_models}" if m.max_models == m.min_models else f"at least {m.min_models}"
            raise ValueError(f"method {m.name!r} takes {want} model(s) besides the base, got {n}")
        params = self.method_params()
        for o in self.overrides:
            self.method_params(o.parameters)
        if m.needs_fisher(params):
            missing = [e.model for e in self.models if not e.fisher]
            if missing:
                raise ValueError(f"method {m.name!r} needs a fisher: path for every model; missing for {missing}")
        return self

    @cached_property
    def spec(self) -> MergeMethod:
        return get_method(self.method)

    def method_params(self, extra: dict[str, Any] | None = None) -> Params:
        merged = {**self.parameters, **(extra or {})}
        try:
            return self.spec.params.model_validate(merged)
        except ValidationError as e:
            raise ValueError(describe_errors(e, f"parameters of method {self.method!r}")) from None

    def params_for(self, tensor_name: str) -> Params:
        for o in self.overrides:
            if re.search(o.pattern, tensor_name):
                return self.method_params(o.parameters)
        return self.method_params()

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as recorded in the manifest."""
        data = self.model_dump(mode="json")
        data["parameters"] = self.method_params().recorded()
        return data


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML; relative model paths are resolved against the YAML's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SarmergeError(f"{path}: cannot read config: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SarmergeError(f"{path}: invalid YAML: {e}") from e
    return parse_config(raw, source=str(path), root=path.parent)


def parse_config(raw: Any, *, source: str = "config", root: Path | None = None) -> MergeConfig:
    """Validate a sarmerge config, or a mergekit one (recognised by `merge_method:`; see `from_mergekit`)."""
    if not isinstance(raw, dict):
        raise SarmergeError(f"{source}: expected a mapping with method, base_model, models; got {type(raw).__name__}")
    if "merge_method" in raw:
        raw = from_mergekit(raw, source=source, root=root)
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as e:
        raise SarmergeError(describe_errors(e, source)) from None
    if root is not None:

        def fix(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() else str((root / p).resolve())

        cfg.base_model = fix(cfg.base_model)
        cfg.tokenizer = fix(cfg.tokenizer)
        for e in cfg.models:
            e.model, e.fisher = fix(e.model), fix(e.fisher)
    return cfg


# ---- the mergekit dialect (SPEC §4.8) --------------------------------------------------------------------------------

# mergekit 0.1.5 method names with a sarmerge counterpart; each runs with `semantics: mergekit`
MERGEKIT_METHODS = {
    "linear": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "della": "della",
    "della_linear": "della_linear",
    "model_stock": "model_stock",
    "slerp": "slerp",
    "ram": "ram",
    "ramplus_tl": "ram_plus",
}
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
MERGEKIT_UNSUPPORTED = {
    "slices": "slices (layer ranges) are not supported; list whole models under models:",
    "modules": "modules are not supported; list whole models under models:",
    "tokenizer": "the tokenizer: block (vocabulary surgery) is not supported; use tokenizer_source: base or a model",
    "chat_template": "chat_template is not supported; the base model's tokenizer files are copied as they are",
}
PER_MODEL = ("weight", "density")  # mergekit's per-model parameters that sarmerge also takes per model
DROPPED = ("int8_mask",)  # changes only mergekit's mask storage, never the merged values
MERGEKIT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                   "bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "float64": "float64"}


def from_mergekit(raw: dict[str, Any], *, source: str = "config", root: Path | None = None) -> dict[str, Any]:
    """Translate a mergekit 0.1.5 YAML (as loaded) into a sarmerge config with `semantics: mergekit` parameters.

    Taken as mergekit reads it: the base model listed again under `models:` is the base, not a model (except for
    `linear`, which averages the base with the models at its weight); per-model
    `parameters:` fall back to the top-level ones; `filter:` lists become per-tensor overrides (substring match,
    first wins); without `dtype:` the merge computes in the stored dtype, and the output is `out_dtype`, else
    `dtype`, else stored. Refused with a clear error: slices, gradients (lists of values), other model references
    (LoRA `+`, dicts), methods sarmerge lacks.
    """

    def fail(msg: str) -> SarmergeError:
        return SarmergeError(f"{source}: mergekit config: {msg}")

    for key, why in MERGEKIT_UNSUPPORTED.items():
        if raw.get(key) is not None:
            raise fail(why)
    unknown = sorted(set(raw) - MERGEKIT_KEYS - set(MERGEKIT_UNSUPPORTED))
    if unknown:
        raise fail(f"unknown field(s) {unknown}; sarmerge reads {sorted(MERGEKIT_KEYS)}")
    method = raw["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise fail(f"merge_method {method!r} has no sarmerge counterpart; supported: {', '.join(MERGEKIT_METHODS)}")
    if not isinstance(raw.get("models"), list) or not raw["models"]:
        raise fail("models: must be a non-empty list of {model: PATH, parameters: {...}}")

    def path(value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise fail(f"{where}: expected a checkpoint path, got {value!r} (only plain paths are supported)")
        if "+" in value and not Path(value).exists():
            raise fail(f"{where}: {value!r}: LoRA references (model+adapter) are not supported")
        return value

    base = path(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    top = raw.get("parameters") or {}
    if not isinstance(top, dict):
        raise fail(f"parameters: expected a mapping, got {top!r}")
    globals_, overrides = _mergekit_parameters(top, fail)

    models, shared = [], {}
    for i, entry in enumerate(raw["models"]):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"}:
            raise fail(f"{where}: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}")
        model = path(entry.get("model"), f"{where}.model")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise fail(f"{where}.parameters: expected a mapping, got {params!r}")
        if model == base and method != "linear":
            continue  # mergekit merges the base as the base even when it is listed among the models
        out: dict[str, Any] = {"model": model}
        for key, value in params.items():
            if key in DROPPED:
                continue
            if not isinstance(value, (int, float, bool, str)):
                raise fail(f"{where}.parameters.{key}: only plain values are supported per model, got {value!r}")
            if key in PER_MODEL:
                out[key] = value
            elif shared.setdefault(key, value) != value:
                raise fail(f"parameters.{key}: differs between models ({shared[key]!r} vs {value!r}); sarmerge "
                           "takes it once per merge")
        for key in PER_MODEL:
            if key not in out and key in globals_:
                out[key] = globals_[key]
        models.append(out)
    if not models:
        raise fail("models: lists only the base model")
    if method == "linear" and base is not None and base not in [m["model"] for m in models]:
        # mergekit's linear averages its base_model with the models, at the top-level weight, summed last
        if "weight" not in globals_:
            raise fail("linear averages base_model with the models: list it under models: with its weight")
        models.append({"model": base, "weight": globals_["weight"]})
    parameters = {k: v for k, v in globals_.items() if k not in PER_MODEL}
    parameters.update(shared)
    parameters["semantics"] = "mergekit"
    for o in overrides:
        if set(o["parameters"]) & set(PER_MODEL):
            raise fail(f"parameters: a filter on {sorted(set(o['parameters']) & set(PER_MODEL))} is not supported "
                       "(sarmerge takes weight and density per model, not per tensor)")
        o["parameters"]["semantics"] = "mergekit"

    out_cfg: dict[str, Any] = {"method": MERGEKIT_METHODS[method], "models": models, "parameters": parameters,
                               "overrides": overrides}
    if base is not None:
        out_cfg["base_model"] = base
    dtype = _mergekit_dtype(raw.get("dtype"), fail, "dtype")
    out_dtype = _mergekit_dtype(raw.get("out_dtype"), fail, "out_dtype")
    if dtype is None:  # mergekit computes in the stored dtype
        stored = _stored_dtype(base or models[0]["model"], root)
        if stored is not None:
            out_cfg["dtype"] = stored
    else:
        out_cfg["dtype"] = dtype
    if out_dtype or dtype:
        out_cfg["out_dtype"] = out_dtype or dtype
    if method == "ramplus_tl" and not out_dtype and out_cfg.get("dtype") in ("bfloat16", "float16"):
        # mergekit writes what the method returns when out_dtype is unset, and its fp32 boost factors promote
        # ramplus_tl's result to fp32: the same files need the same dtype
        out_cfg["out_dtype"] = "float32"
    tok = raw.get("tokenizer_source")
    if tok == "union":
        raise fail("tokenizer_source: union (vocabulary surgery) is not supported; use base or a model path")
    if tok not in (None, "base"):
        out_cfg["tokenizer"] = path(tok, "tokenizer_source")
    return out_cfg


def _mergekit_parameters(top: dict[str, Any], fail: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Top-level mergekit parameters → (global values, per-tensor overrides). A value may be a list of
    `{filter, value}` conditions (first matching wins; no filter or `*` = everything) on one parameter."""
    globals_: dict[str, Any] = {}
    overrides: list[dict[str, Any]] = []
    for key, value in top.items():
        if key in DROPPED:
            continue
        if isinstance(value, (int, float, bool, str)):
            globals_[key] = value
            continue
        conditions = [value] if isinstance(value, dict) else value
        if not isinstance(conditions, list) or not all(isinstance(c, dict) for c in conditions):
            raise fail(f"parameters.{key}: gradients (lists of values interpolated over layers) are not supported; "
                       f"got {value!r}")
        if overrides:
            raise fail(f"parameters.{key}: filters on more than one parameter are not supported")
        for c in conditions:
            if set(c) - {"filter", "value"} or not isinstance(c.get("value"), (int, float, bool, str)):
                raise fail(f"parameters.{key}: expected {{filter: NAME_PART, value: SCALAR}}, got {c!r}")
            flt = c.get("filter")
            if flt is None or flt == "*":
                globals_[key] = c["value"]
                break
            overrides.append({"pattern": re.escape(str(flt)), "parameters": {key: c["value"]}})
    return globals_, overrides


def _mergekit_dtype(value: Any, fail: Any, field: str) -> str | None:
    if value is None:
        return None
    if value not in MERGEKIT_DTYPES:
        raise fail(f"{field}: {value!r} is not one of {sorted(MERGEKIT_DTYPES)}")
    return MERGEKIT_DTYPES[value]


def _stored_dtype(model: str, root: Path | None) -> str | None:
    """The dtype of the first floating-point tensor of a checkpoint (None if it cannot be read here: preflight
    reports that later, with its own message)."""
    from sarmerge.checkpoint import SAFETENSORS_DTYPES, Checkpoint

    p = Path(model) if root is None or Path(model).is_absolute() else root / model
    try:
        ckpt = Checkpoint(p)
    except (SarmergeError, OSError):
        return None
    try:
        for info in ckpt.tensors.values():
            dt = SAFETENSORS_DTYPES[info.dtype]
            if dt.is_floating_point:
                name = str(dt).removeprefix("torch.")
                return name if name in MERGEKIT_DTYPES.values() else None
    finally:
        ckpt.close()
    return None
