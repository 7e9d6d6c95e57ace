"""One options model per command. Its fields are the command's knobs: the CLI flags, the Python API's keyword
arguments and the pipeline's `params.yaml` section all derive from it, so a default, a range or a choice is written
once (mergekit's `MergeOptions` drives its click flags the same way).

Inputs and outputs of one invocation (model, data, out, --overwrite) are not options: they stay plain arguments.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable
from typing import Any, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sarmerge.errors import SarmergeError
from sarmerge.layout import parse_size


def _field(loc: tuple[Any, ...]) -> str:
    return "field '" + (".".join(str(x) for x in loc) or "(top level)") + "'"


def describe_errors(e: ValidationError, where: str, name: Callable[[tuple[Any, ...]], str] = _field,
                    most: int = 5) -> str:
    """A pydantic error as one line per bad field, each naming where it is and the value it got."""
    parts = []
    for err in e.errors():
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where + ': ' if where else ''}{name(err['loc'])}: {msg} (got {err.get('input')!r})")
    more = f"; and {len(parts) - most} more" if len(parts) > most else ""
    return "; ".join(parts[:most]) + more


def _bare(annotation: Any) -> Any:
    """The type without `None` (`int | None` → `int`): what a flag's value parses as."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


class Options(BaseModel):
    """Base of the per-command options: unknown names are errors; `flag()` is each field's CLI spelling."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def flag(cls, name: str) -> str:
        field = cls.model_fields[name]
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "flag" in extra:
            return str(extra["flag"])
        return "--" + name.replace("_", "-")

    @classmethod
    def build(cls, values: dict[str, Any], *, cli: bool = False, where: str = "") -> Self:
        """Validate `values` into the options; one SarmergeError naming each bad field (as a flag when `cli`)."""
        def name(loc: tuple[Any, ...]) -> str:
            return cls.flag(str(loc[0])) if cli and loc and loc[0] in cls.model_fields else _field(loc)

        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise SarmergeError(describe_errors(e, where, name)) from None

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """One flag per field. Flags the user does not give stay out of the namespace, so defaults live only here."""
        for name, field in cls.model_fields.items():
            kind = _bare(field.annotation)
            default = field.get_default(call_default_factory=True)
            text = field.description or ""
            kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
            if kind is bool:
                # a default-on switch is turned off by its flag (e.g. --no-chat-template)
                kw["action"] = "store_false" if default else "store_true"
            else:
                if get_origin(kind) is Literal:
                    kw["choices"] = list(get_args(kind))
                elif kind in (int, float, str):
                    kw["type"] = kind
                if default is not None:
                    text = f"{text} (default {default})" if text else f"default {default}"
            parser.add_argument(cls.flag(name), help=text, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls.build({k: v for k, v in vars(args).items() if k in cls.model_fields}, cli=True)

    @classmethod
    def resolve(cls, options: Self | None, overrides: dict[str, Any], *, where: str) -> Self:
        """The Python API's rule: an options object, keyword overrides, or both (keywords win)."""
        if options is None:
            return cls.build(overrides, where=where)
        if not overrides:
            return options
        return cls.build({**options.model_dump(), **overrides}, where=where)


def _size(text: str) -> str:
    try:
        parse_size(text)
    except SarmergeError as e:  # pydantic reports ValueErrors against the field
        raise ValueError(str(e)) from None
    return text


Mode = Literal["sampled", "empirical"]
PerExample = Literal["auto", "hooks", "vmap", "loop"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class FisherOptions(Options):
    """`sarmerge fisher` / `run_fisher` / params.yaml `fisher:` (which adds the pipeline's own keys)."""

    mode: Mode = Field("sampled", description="sampled: responses drawn from the model (the true Fisher); "
                                              "empirical: the references")
    examples: int | None = Field(None, ge=1, description="number of examples (default: every line; sampled mode "
                                                         "cycles the prompts beyond that)")
    epsilon: float = Field(1e-5, ge=0, description="support threshold on |θ − θ_base| (with --support-of)")
    device: str | None = Field(None, description="cuda | cuda:N | cpu (default: cuda when available)")
    dtype: Dtype = Field("auto", description="weights' compute dtype (auto: bfloat16 on CUDA, float32 on CPU); "
                                             "sums are always fp32")
    batch_size: int = Field(8, ge=1, description="examples per forward/backward")
    max_new_tokens: int = Field(256, ge=1, description="sampled response length limit")
    seed: int = 0
    per_example: PerExample = Field("auto", description="how per-example gradients are computed (auto: hooks when "
                                                        "verified against loop, else loop)")
    gradient_checkpointing: bool = Field(False, description="recompute layer activations in the backward pass (less "
                                                            "memory, per-example loop)")
    checkpoint_every: int = Field(64, ge=0, description="save partial sums every K examples for --resume "
                                                        "(0 = never)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    shard_size: str = Field("5GB", description="max bytes per output shard")

    @field_validator("shard_size")
    @classmethod
    def _sizes(cls, v: str) -> str:
        return _size(v)


class EvaluateOptions(Options):
    """`sarmerge evaluate` / `evaluate()` / params.yaml `evaluate:` (which adds the domain → suite map)."""

    limit: int | None = Field(None, ge=1, description="first N problems of each suite (procedural suites: "
                                                      "generate N)")
    n: int = Field(1, ge=1, description="samples per problem")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, description="default: each suite's own budget")
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vllm on a GPU machine when installed, "
                                                                       "else hf")
    batch_size: int = Field(16, ge=1, description="sequences per generation batch (hf)")
    seed: int = Field(0, description="sampling, procedural data and bootstrap seed")
    device: str | None = Field(None, description="hf device: cpu | cuda | cuda:N (default: cuda when present)")
    dtype: Dtype = "auto"
    use_chat_template: bool = Field(True, description="use the model's chat template when it has one (off: bare text)",
                                    json_schema_extra={"flag": "--no-chat-template"})
    workers: int | None = Field(None, ge=1, description="parallel sandbox processes (default min(4, CPUs))")
    sandbox_timeout: float = Field(15.0, gt=0, description="wall seconds per code sample")
    sandbox_cpu: int = Field(10, ge=1, description="CPU seconds per code sample")
    sandbox_memory: str = Field("1GiB", description="address space per code sample")
    sandbox_scratch: str = Field("64MiB", description="scratch tmpfs size per code sample")
    allow_unisolated: bool = Field(False, description="run code/reasoning-gym suites even where the sandbox cannot "
                                                      "isolate (rlimits only): model output can then reach the "
                                                      "network, your files and your environment")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")

    @field_validator("sandbox_memory", "sandbox_scratch")
    @classmethod
    def _sizes(cls, v: str) -> str:
        return _size(v)

    def sandbox_limits(self) -> Any:
        from sarmerge.evaluate.sandbox import SandboxLimits

        return SandboxLimits(cpu_seconds=self.sandbox_cpu, wall_seconds=self.sandbox_timeout,
                             memory_bytes=parse_size(self.sandbox_memory),
                             scratch_bytes=parse_size(self.sandbox_scratch))
