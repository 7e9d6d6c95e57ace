"""The one registry of merge methods.

A method is a pure function over the aligned tensors of one parameter name (a `TensorGroup`) plus its validated
parameters, registered with `@merge_method`. Adding a method is adding one module to this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from sarmerge.errors import SarmergeError

# How the engine may split a tensor for this method without changing its result: "element" (any row chunks),
# "row" (row chunks; 1-D tensors whole), "multi_pass" (element chunks, after one pass over the same chunks per
# function in the method's `stats`, whose results are summed into whole-tensor statistics: support counts, the
# histograms of an exact top-k) or "tensor" (whole tensors only: norms, RNG streams).
Chunking = Literal["element", "row", "multi_pass", "tensor"]


class Params(BaseModel):
    """Base of every method's parameter schema: unknown keys are errors.

    The method protocol: a schema may override `needs_fisher()` (whether these parameters read the Fisher stores of
    a method registered with `fisher="any"|"dense"`) and `chunking()` (how the engine may stream a tensor with these
    parameters; None = the method's registered `chunking`). Callers ask the `MergeMethod`, never `getattr`.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    def needs_fisher(self) -> bool:
        return True

    def chunking(self) -> Chunking | None:
        return None

    def recorded(self) -> dict[str, Any]:
        """The parameters as the manifest records them (YAML names, every default filled in)."""
        return self.model_dump(by_alias=True)


@dataclass
class TensorGroup:
    """Everything a method sees for one tensor name: inputs in the compute dtype, on the compute device."""

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    weights: list[float]
    densities: list[float | None]
    fishers: list[torch.Tensor | None] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Whole-tensor statistics summed by the engine over statistics passes of row chunks ("multi_pass" methods); None
    # when the method sees the whole tensor and computes them itself. The same dict reaches every chunk of the merge
    # pass, in row order, so a method may also keep running state in it (e.g. ties taken so far).
    stats: dict[str, torch.Tensor] | None = None

    @cached_property
    def deltas(self) -> list[torch.Tensor]:
        """Task vectors τ_t = θ_t − θ₀, computed in place: afterwards `models` is emptied (memory stays N+1 tensors)."""
        if self.base is None:
            raise SarmergeError(f"{self.name}: this method needs base_model")
        out = [m.sub_(self.base) for m in self.models]
        self.models = []
        return out

    def density(self, i: int, default: float) -> float:
        d = self.densities[i]
        return default if d is None else d

    def rand(self, shape: torch.Size) -> torch.Tensor:
        """Uniform [0,1) draws from this tensor's own seeded CPU generator (reproducible on any device)."""
        device = (self.base if self.base is not None else self.models[0]).device
        return torch.rand(shape, generator=self.generator).to(device)


MethodFn = Callable[[TensorGroup, Any], torch.Tensor]
StatsFn = Callable[[TensorGroup, Any], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    params: type[Params]
    needs_base: bool
    fisher: Literal["none", "any", "dense"]
    min_models: int
    max_models: int | None
    description: str
    chunking: Chunking
    stats: tuple[StatsFn, ...] = ()
    # How sarmerge's own semantics differ from mergekit 0.1.5's method of that name (what `semantics: mergekit`,
    # i.e. a mergekit YAML, changes); None: mergekit has no such method
    mergekit: str | None = None

    def needs_fisher(self, params: Params) -> bool:
        """Whether a merge with these parameters reads a Fisher store per model."""
        return self.fisher != "none" and params.needs_fisher()

    def chunking_for(self, params: Params) -> Chunking:
        """How the engine may stream a tensor with these parameters (the schema's choice, else the registered one)."""
        mode = params.chunking() or self.chunking
        if mode == "multi_pass" and not self.stats:
            raise RuntimeError(f"merge method {self.name!r} streams in several passes but registers no stats function")
        return mode


REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    params: type[Params] = Params,
    needs_base: bool = True,
    fisher: Literal["none", "any", "dense"] = "none",
    min_models: int = 1,
    max_models: int | None = None,
    chunking: Chunking = "tensor",
    stats: StatsFn | tuple[StatsFn, ...] = (),
    mergekit: str | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn(group, params) -> merged tensor` under `name`.

    `chunking` declares how the engine may stream a tensor through the method (default: whole tensors; a parameter
    schema may choose per configuration through `Params.chunking`); a
    "multi_pass" method also gives `stats`, one function `(group, params) -> {key: tensor}` per pass, each returning
    its own keys. Their sums over a tensor's chunks reach later passes and `fn` as `group.stats`. `mergekit` says
    where these semantics differ from mergekit 0.1.5's (shown by `sarmerge methods`).
    """

    def register(fn: MethodFn) -> MethodFn:
        if name in REGISTRY:
            raise RuntimeError(f"merge method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = MergeMethod(
            name, fn, params, needs_base, fisher, min_models, max_models, doc[0] if doc else "", chunking,
            stats if isinstance(stats, tuple) else (stats,), mergekit,
        )
        return fn

    return register


_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True


def get_method(name: str) -> MergeMethod:
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise SarmergeError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(REGISTRY))}") from None


def all_methods() -> dict[str, MergeMethod]:
    _load_all()
    return dict(sorted(REGISTRY.items()))
