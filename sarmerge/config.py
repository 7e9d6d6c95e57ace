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
        if m.fisher != "none" and getattr(params, "uses_fisher", lambda: True)():
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
            raise ValueError(_describe(e, f"parameters of method {self.method!r}")) from None

    def params_for(self, tensor_name: str) -> Params:
        for o in self.overrides:
            if re.search(o.pattern, tensor_name):
                return self.method_params(o.parameters)
        return self.method_params()

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as recorded in the manifest."""
        data = self.model_dump(mode="json")
        data["parameters"] = self.method_params().model_dump(by_alias=True)
        return data


def _describe(e: ValidationError, where: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: field '{loc}': {msg} (got {err.get('input')!r})")
    return "; ".join(parts)


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
    if not isinstance(raw, dict):
        raise SarmergeError(f"{source}: expected a mapping with method, base_model, models; got {type(raw).__name__}")
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as e:
        raise SarmergeError(_describe(e, source)) from None
    if root is not None:

        def fix(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() else str((root / p).resolve())

        cfg.base_model = fix(cfg.base_model)
        cfg.tokenizer = fix(cfg.tokenizer)
        for e in cfg.models:
            e.model, e.fisher = fix(e.model), fix(e.fisher)
    return cfg
