"""MLflow Model Registry conventions (SPEC §8), shared by every pipeline step.

Checkpoints are plain safetensors artifacts (`runs:/<run>/checkpoint`), never an MLflow flavor. Each model version
carries:

- `sarmerge.kind`: `base` | `rlvr` | `merged`
- `sarmerge.domain`: `math`, `code`, … (a merge of several domains: `code+math`)
- `sarmerge.base`: `models:/<name>/<version>#sha256=<hex>` — registry URI and content digest of the base checkpoint
- `sarmerge.sha256`: content digest of the checkpoint (weights, config, tokenizer), used to detect duplicates

Merged versions add lineage tags (parents, method, params hash, DVC revision); RLVR versions get ledger tags
(`sarmerge.pipeline.*`) so each one is processed exactly once however many trigger events name it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sarmerge.errors import SarmergeError
from sarmerge.layout import CONTENT_FILES, sha256_file

if TYPE_CHECKING:  # mlflow is imported lazily: steps that only hit a cache should start fast
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

TAG_KIND = "sarmerge.kind"
TAG_DOMAIN = "sarmerge.domain"
TAG_BASE = "sarmerge.base"
TAG_SHA256 = "sarmerge.sha256"
# lineage of merged versions
TAG_PARENTS = "sarmerge.parents"
TAG_METHOD = "sarmerge.method"
TAG_PARAMS_HASH = "sarmerge.params_hash"
TAG_JOB = "sarmerge.job"
TAG_MERGE_KEY = "sarmerge.merge_key"
TAG_DVC_REPO = "sarmerge.dvc.repo"
TAG_DVC_REV = "sarmerge.dvc.rev"
TAG_DVC_REMOTE = "sarmerge.dvc.remote"
TAG_DAG_RUN = "sarmerge.dag_run"
TAG_SCORES = "sarmerge.scores"  # JSON suite → score measured at registration (the regression baseline)
TAG_EVAL = "sarmerge.eval"  # JSON evaluation settings of those scores
TAG_SANDBOX = "sarmerge.sandbox"  # JSON: mode, isolated, memory_cap, failed probes of the merged model's evaluation
TAG_SANDBOX_MODE = "sarmerge.sandbox.mode"  # bwrap | rlimits | none (no suite ran code)
TAG_SANDBOX_ISOLATED = "sarmerge.sandbox.isolated"  # true | false | n/a
TAG_GATE = "sarmerge.gate"
TAG_GATE_DETAIL = "sarmerge.gate.detail"
TAG_REGRESSION = "sarmerge.regression"
TAG_REGRESSION_DETAIL = "sarmerge.regression.detail"
# the exactly-once ledger, on RLVR versions
TAG_STATE = "sarmerge.pipeline.state"  # claimed | done | skipped
TAG_CLAIMED_BY = "sarmerge.pipeline.run"
TAG_JOBS = "sarmerge.pipeline.jobs"
TAG_REASON = "sarmerge.pipeline.reason"
# on MLflow runs: the run's artifacts were all logged (a run without it was interrupted and is not reused)
TAG_COMPLETE = "sarmerge.artifacts_complete"

KINDS = ("base", "rlvr", "merged")
CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_EXPERIMENT = "sarmerge-registry"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DOMAIN_RE = re.compile(r"[a-z0-9][a-z0-9_]{0,31}(\+[a-z0-9][a-z0-9_]{0,31}){0,15}")
_MODEL_URI_RE = re.compile(r"models:/(?P<name>[^/@#]+)"
                           r"(?:/(?P<version>[1-9][0-9]{0,9})|@(?P<alias>[A-Za-z0-9_-]{1,255}))")
_BASE_TAG_RE = re.compile(r"(?P<uri>models:/[^#]+)#sha256=(?P<sha>[0-9a-f]{64})")


# Validation is always re.fullmatch over ASCII classes: re.match with `$` accepts a trailing newline, and \d or
# str.isdigit() accept digits int() rejects ('²') or other scripts' digits.
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def validate_version(version: object, what: str = "model version") -> str:
    """A registry version number as a string: 1-10 ASCII digits, no sign, no leading zero."""
    text = str(version)
    if isinstance(version, bool) or not _VERSION_RE.fullmatch(text):
        raise SarmergeError(f"{what} {text!r}: expected a version number (1, 2, …)")
    return text


def validate_name(name: str, what: str = "--name") -> str:
    """Registry names reach file paths and URLs: allow only a safe alphabet (no '/', no '..')."""
    if not is_valid_name(name):
        raise SarmergeError(
            f"{what} {name!r}: model names must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def validate_domain(domain: str, what: str = "--domain") -> str:
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise SarmergeError(f"{what} {domain!r}: domains are lowercase words like 'math' or 'code' (a-z, 0-9, _)")
    return domain


_SECRET_QUERY_KEY = re.compile(r"(?i).*(token|pass|secret|sig|signature|key|credential|auth|session).*")


def strip_credentials(url: str) -> str:
    """A URL fit to be recorded (tags, descriptions, committed files, logs): without userinfo and without query
    parameters that look like credentials. `s3://KEY:SECRET@bucket/p` → `s3://bucket/p`, `https://u:pw@host/x` →
    `https://host/x`; scp-like `user:pw@host:path` → `host:path`; plain paths are returned unchanged."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if "://" not in url:
        return re.sub(r"^[^@/]*:[^@/]*@", "", url)  # `git@host:repo` keeps its (non-secret) user
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if not _SECRET_QUERY_KEY.fullmatch(k)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def content_files(path: Path) -> list[Path]:
    """The files whose bytes define a checkpoint: safetensors weights plus config and tokenizer files."""
    weights = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not weights:
        raise SarmergeError(f"{path}: no *.safetensors weights found")
    return weights + [path / n for n in CONTENT_FILES if (path / n).is_file()]


def content_digest(path: str | Path) -> str:
    """sha256 over (file name, file sha256) of the content files: equal for byte-identical checkpoints."""
    path = Path(path)
    lines = [f"{f.name} {sha256_file(f)}\n" for f in content_files(path)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def safe_key(text: str) -> str:
    """A suite name as an MLflow metric/tag key component (portable characters only)."""
    return re.sub(r"[^\w.\-/ ]", "_", text)


def params_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (method parameters, eval settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelRef:
    """One registered model version, as the pipeline sees it."""

    name: str
    version: str
    kind: str
    domain: str
    base: str
    sha256: str
    run_id: str | None
    source: str
    tags: dict[str, str]
    created: int = 0  # creation timestamp (ms)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def base_sha256(self) -> str | None:
        return parse_base_tag(self.base)[1] if self.base else None

    @classmethod
    def from_version(cls, mv: ModelVersion) -> ModelRef:
        tags = dict(mv.tags or {})
        return cls(
            name=mv.name,
            version=str(mv.version),
            kind=tags.get(TAG_KIND, ""),
            domain=tags.get(TAG_DOMAIN, ""),
            base=tags.get(TAG_BASE, ""),
            sha256=tags.get(TAG_SHA256, ""),
            run_id=mv.run_id,
            source=mv.source,
            tags=tags,
            created=int(mv.creation_timestamp or 0),
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind, "domain": self.domain,
                "base": self.base, "sha256": self.sha256, "run_id": self.run_id, "source": self.source}


def base_tag(uri: str, sha256: str) -> str:
    return f"{uri}#sha256={sha256}"


def parse_base_tag(tag: str) -> tuple[str, str]:
    m = _BASE_TAG_RE.fullmatch(tag or "")
    if not m:
        raise SarmergeError(f"tag {TAG_BASE}={tag!r}: expected 'models:/NAME/VERSION#sha256=<64 hex digits>'")
    return m["uri"], m["sha"]


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` → (name, version, alias)."""
    m = _MODEL_URI_RE.fullmatch(uri or "")
    if not m:
        raise SarmergeError(f"{uri!r}: expected a registry URI like models:/NAME/VERSION or models:/NAME@ALIAS")
    validate_name(m["name"], "model name")
    return m["name"], m["version"], m["alias"]


# -- MLflow access --------------------------------------------------------------------------------------------------
def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SarmergeError("no MLflow server: set MLFLOW_TRACKING_URI (e.g. http://127.0.0.1:5000) or pass "
                            "--tracking-uri")
    return uri


def get_client(uri: str | None = None) -> MlflowClient:
    import mlflow
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def is_error(exc: BaseException, code: str) -> bool:
    return getattr(exc, "error_code", None) == code


def search_versions(client: MlflowClient, filter_string: str) -> Iterator[ModelVersion]:
    token = None
    while True:
        page = client.search_model_versions(filter_string, max_results=200, page_token=token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def tag_filter(**tags: str) -> str:
    """MLflow search filter for exact tag values (keys with dots need backticks)."""
    parts = []
    for key, value in tags.items():
        if "'" in value:
            raise SarmergeError(f"tag value {value!r} contains a quote")
        parts.append(f"tags.`{key}` = '{value}'")
    return " and ".join(parts)


def find_by_tags(client: MlflowClient, **tags: str) -> list[ModelRef]:
    found = [ModelRef.from_version(mv) for mv in search_versions(client, tag_filter(**tags))]
    return sorted(found, key=lambda r: (r.name, int(r.version)))


def find_by_digest(client: MlflowClient, digest: str) -> ModelRef | None:
    found = find_by_tags(client, **{TAG_SHA256: digest})
    return found[0] if found else None


def get_ref(client: MlflowClient, name: str, version: str | int) -> ModelRef:
    try:
        return ModelRef.from_version(client.get_model_version(validate_name(name, "model name"), str(version)))
    except Exception as e:
        if is_error(e, "RESOURCE_DOES_NOT_EXIST"):
            raise SarmergeError(f"models:/{name}/{version}: no such model version in the registry") from None
        raise


def alias_ref(client: MlflowClient, name: str, alias: str) -> ModelRef | None:
    """The version an alias points at (search results carry no aliases: SPEC §12), or None."""
    try:
        return ModelRef.from_version(client.get_model_version_by_alias(name, alias))
    except Exception as e:
        if is_error(e, "RESOURCE_DOES_NOT_EXIST") or is_error(e, "INVALID_PARAMETER_VALUE"):
            return None
        raise


def resolve_uri(client: MlflowClient, uri: str) -> ModelRef:
    name, version, alias = parse_model_uri(uri)
    if version is not None:
        return get_ref(client, name, version)
    ref = alias_ref(client, name, alias or "")
    if ref is None:
        raise SarmergeError(f"{uri}: alias {alias!r} is not set on registered model {name!r}")
    return ref


def ensure_registered_model(client: MlflowClient, name: str, description: str | None = None) -> None:
    try:
        client.create_registered_model(name, description=description)
    except Exception as e:
        if not is_error(e, "RESOURCE_ALREADY_EXISTS"):
            raise


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception as e:
        if is_error(e, "RESOURCE_ALREADY_EXISTS"):  # created concurrently by another step
            return client.get_experiment_by_name(name).experiment_id
        raise


def find_complete_run(client: MlflowClient, experiment_id: str, key: str, value: str) -> str | None:
    """A finished run tagged key=value whose artifacts were all logged (reused by a retry); interrupted ones are
    deleted so they do not clutter the UI."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=50)
    good = None
    for run in runs:
        if run.data.tags.get(TAG_COMPLETE) == "1" and run.info.status == "FINISHED" and good is None:
            good = run.info.run_id
        elif run.data.tags.get(TAG_COMPLETE) != "1":
            log.info("deleting interrupted run %s (%s=%s)", run.info.run_id, key, value)
            client.delete_run(run.info.run_id)
    return good


def set_tags(client: MlflowClient, ref: ModelRef, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(ref.name, ref.version, k, str(v))


def download_checkpoint(client: MlflowClient, ref: ModelRef, dest: Path) -> Path:
    """Download a version's checkpoint into `dest` (atomically) and check its digest against `sarmerge.sha256`."""
    dest = Path(dest)
    if dest.is_dir() and ref.sha256 and content_digest(dest) == ref.sha256:
        return dest
    if not ref.run_id:
        raise SarmergeError(f"{ref.uri}: has no run; sarmerge checkpoints are logged under runs:/<run>/checkpoint")
    import mlflow

    tmp = dest.parent / f".{dest.name}.download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(tmp),
                                            tracking_uri=mlflow.get_tracking_uri())
        got = tmp / CHECKPOINT_ARTIFACT
        digest = content_digest(got)
        if ref.sha256 and digest != ref.sha256:
            raise SarmergeError(f"{ref.uri}: downloaded checkpoint has sha256 {digest}, registry says {ref.sha256}")
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ledger_state(ref: ModelRef) -> str | None:
    return ref.tags.get(TAG_STATE)


def latest(refs: Iterable[ModelRef]) -> ModelRef | None:
    refs = list(refs)
    return max(refs, key=lambda r: int(r.version)) if refs else None
