"""`params.yaml`: the pipeline's tunables, validated before any work (SPEC §2). DVC reads the same file for `dvc repro`.

Environment overrides (for deployments that cannot edit the file): `SARMERGE_PARAMS` (path of the file),
`SARMERGE_PIPELINE_ROOT` (pipeline.root), `SARMERGE_RUNNER` (pipeline.runner).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sarmerge.errors import SarmergeError
from sarmerge.options import EvaluateOptions, FisherOptions, describe_errors
from tasks.containers import ContainersCfg

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineCfg(_Strict):
    root: str = Field("runs/pipeline", description="workspaces, caches, ledger, lineage repo, DVC remote (relative "
                                                   "to the repo)")
    runner: str = Field("local", description="how DAG tasks run steps: local | docker | kubernetes")
    experiment: str = Field("sarmerge-pipeline", description="MLflow experiment of pipeline runs")
    python: str = Field("", description="interpreter for local steps (default: the one running Airflow)")
    step_timeout_s: int = Field(3600, gt=0)
    retries: int = Field(1, ge=0)
    retry_delay_s: float = Field(10.0, ge=0)
    gpu_queue: str = Field("gpu", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                           description="Celery queue of GPU steps (workers on GPU hosts listen on it)")


class FamilyCfg(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    models: str = Field(description="regex (full match) on registered-model names of this family's RLVR checkpoints")
    merged_model: str = Field(description="registered model that receives the merged versions")
    watcher: bool | None = Field(None, description="poll the registry for this family (default: trigger.watcher); "
                                                   "false leaves it to the webhook relay")

    @field_validator("models")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from e
        return v

    def matches(self, model_name: str) -> bool:
        return re.fullmatch(self.models, model_name) is not None

    @property
    def asset_name(self) -> str:
        return f"sarmerge_family_{self.name}"

    @property
    def asset_uri(self) -> str:
        return f"mlflow-registry://sarmerge/{self.name}"


class RelayCfg(_Strict):
    max_age_s: int = Field(300, gt=0, description="reject deliveries older (or further in the future) than this")
    max_body_bytes: int = Field(1 << 20, gt=0, le=1 << 26, description="larger Content-Length: 413 before reading")
    read_timeout_s: float = Field(10.0, gt=0, description="a connection must send headers and body within this")
    max_connections: int = Field(64, ge=1, le=4096, description="connections handled at once; more get 503 at once")
    backlog: int = Field(256, ge=1, description="listen backlog (connections waiting to be accepted)")


class TriggerCfg(_Strict):
    watcher: bool = True
    poll_interval_s: float = Field(5.0, gt=0)
    relay: RelayCfg = Field(default_factory=RelayCfg)


class PairingCfg(_Strict):
    fusion: bool = Field(True, description="merge with the champion (else latest) of every other domain, same base")
    enhancement: bool = Field(True, description="merge with the other versions of the same domain, same base")
    partner_alias: str = "champion"
    max_partners: int = Field(3, ge=1)
    sweep_unprocessed: bool = Field(True, description="also claim unprocessed versions no event named (lost events)")


class MergeCfg(_Strict):
    primary: str = "sar"
    seed: int = 0
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    methods: dict[str, dict[str, Any]] = Field(min_length=1)

    @model_validator(mode="after")
    def _primary_listed(self) -> MergeCfg:
        if self.primary not in self.methods:
            raise ValueError(f"merge.primary {self.primary!r} is not one of merge.methods {sorted(self.methods)}")
        return self


class FisherCfg(FisherOptions):
    """Every `sarmerge fisher` option (sarmerge.options.FisherOptions), plus the pipeline's own keys."""

    support_only: bool = Field(True, description="store Fisher only where the checkpoint moved (all SAR needs)")
    data: dict[str, str] = Field(default_factory=lambda: {"math": "math", "code": "code"},
                                 description="domain → calibration JSONL (path or shipped name), used when the "
                                             "checkpoint was registered without --calib")

    def options(self) -> FisherOptions:
        return FisherOptions.model_validate(self.model_dump(include=set(FisherOptions.model_fields)))


class EvaluateCfg(EvaluateOptions):
    """Every `sarmerge evaluate` option (sarmerge.options.EvaluateOptions), plus the domain → suite map."""

    suites: dict[str, str] = Field(description="domain → evaluation suite (own-domain score)", min_length=1)

    def options(self) -> EvaluateOptions:
        return EvaluateOptions.model_validate(self.model_dump(include=set(EvaluateOptions.model_fields)))


class AnalyzeCfg(_Strict):
    geometry: bool = True
    epsilon: float = Field(1e-5, ge=0)


class GateCfg(_Strict):
    """Paired non-inferiority gates (sarmerge/stats.py): verdict pass | fail | inconclusive, each with its interval."""

    margin: float = Field(0.03, ge=0, le=1, description="a merge may score at most this much (absolute) below each "
                                                         "parent on the parent's own suite")
    min_retention: float | None = Field(None, ge=0, le=1, description="also allow losing (1 - this) of the parent's "
                                                                       "gain over the base (margin = the larger)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided confidence of the gate intervals")
    power: float = Field(0.8, gt=0, lt=1, description="power the decision size is computed for")
    no_suite_below_base: bool = True
    base_margin: float = Field(0.03, ge=0, le=1, description="non-inferiority margin against the base, every suite")
    resamples: int = Field(4000, ge=200, description="bootstrap resamples (several samples per problem)")


class PromoteCfg(_Strict):
    auto_promote: bool = False
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"


class RegressionCfg(_Strict):
    schedule: str | None = "0 3 * * *"
    aliases: list[str] = Field(default_factory=lambda: ["champion"])
    tolerance: float = Field(0.05, ge=0, le=1, description="a drop is flagged when the paired interval of (now - "
                                                          "recorded) lies wholly below -tolerance")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided confidence of the regression interval")
    limit: int | None = Field(None, ge=1, description="eval limit (default: evaluate.limit, as at registration)")


class DvcCfg(_Strict):
    remote: str = Field("", description="DVC remote URL (s3://…, gs://…, a path); empty: <root>/dvc-remote")
    git_remote: str = Field("", description="git remote receiving lineage commits; empty: <root>/lineage.git")


class JobParent(_Strict):
    domain: str
    model: str = Field("", description="registry URI it came from (informational)")


class JobCfg(_Strict):
    """The job a DVC workspace reproduces. The repo's own params.yaml holds one for `dvc repro` by hand."""

    id: str = "manual"
    family: str = ""
    inputs: str = Field(description="folder with base/, one folder per parent, calib_<domain>.jsonl")
    out: str = "out"
    base: str = "base"
    parents: dict[str, JobParent] = Field(min_length=1, description="parent folder name → its domain")
    suites: list[str] = Field(min_length=1, description="suites every model of the job is evaluated on")


class Params(_Strict):
    pipeline: PipelineCfg = Field(default_factory=PipelineCfg)
    families: list[FamilyCfg] = Field(min_length=1)
    trigger: TriggerCfg = Field(default_factory=TriggerCfg)
    pairing: PairingCfg = Field(default_factory=PairingCfg)
    merge: MergeCfg
    fisher: FisherCfg = Field(default_factory=FisherCfg)
    evaluate: EvaluateCfg
    analyze: AnalyzeCfg = Field(default_factory=AnalyzeCfg)
    gate: GateCfg = Field(default_factory=GateCfg)
    promote: PromoteCfg = Field(default_factory=PromoteCfg)
    regression: RegressionCfg = Field(default_factory=RegressionCfg)
    dvc: DvcCfg = Field(default_factory=DvcCfg)
    containers: ContainersCfg = Field(default_factory=ContainersCfg, description="docker/kubernetes runners "
                                                                                   "(tasks/containers.py)")
    job: JobCfg | None = None

    def watched(self, family: FamilyCfg) -> bool:
        return self.trigger.watcher if family.watcher is None else family.watcher

    def family_of(self, model_name: str) -> FamilyCfg | None:
        return next((f for f in self.families if f.matches(model_name)), None)

    def family_named(self, name: str) -> FamilyCfg:
        for f in self.families:
            if f.name == name:
                return f
        raise SarmergeError(f"params.yaml: no family named {name!r} (known: {[f.name for f in self.families]})")

    @property
    def root(self) -> Path:
        p = Path(os.environ.get("SARMERGE_PIPELINE_ROOT") or self.pipeline.root)
        return p if p.is_absolute() else (REPO_ROOT / p)

    @property
    def runner(self) -> str:
        return os.environ.get("SARMERGE_RUNNER") or self.pipeline.runner


def params_path(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("SARMERGE_PARAMS") or DEFAULT_PARAMS)


def load_params(path: str | Path | None = None) -> Params:
    path = params_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SarmergeError(f"{path}: cannot read params: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SarmergeError(f"{path}: invalid YAML: {e}") from e
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise SarmergeError(f"{source}: expected a mapping of sections (pipeline, families, merge, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise SarmergeError(describe_errors(e, source)) from None


def dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json", exclude_none=False), sort_keys=False)
