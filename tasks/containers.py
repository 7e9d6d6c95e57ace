"""`params.yaml` `containers:`: where the container runners (`pipeline.runner: docker | kubernetes`) run the steps.

Images, sockets and cluster settings come from here (or the environment), never from code edits. Environment
overrides, for deployments that cannot edit the file: `SARMERGE_CPU_IMAGE`, `SARMERGE_GPU_IMAGE`, `DOCKER_HOST`
(containers.docker.url), `SARMERGE_K8S_NAMESPACE`.

No Airflow imports: the steps validate the same `params.yaml` inside their containers.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables whose values are credentials: never a plain value in a pod spec, a serialized DAG or a committed file.
# Matched on `_`-separated words (TOKENIZERS_PARALLELISM is no token); every AWS_*/AZURE_* variable counts.
_SECRET_ENV = re.compile(r"(?i)(?:.*_)?(?:PASSWORD|PASSWD|PASS|TOKEN|SECRET|CREDENTIALS?|API_?KEY|ACCESS_KEY|"
                         r"PRIVATE_KEY|AUTH|AUTHORIZATION)(?:_.*)?|AWS_.*|AZURE_.*|GOOGLE_APPLICATION_CREDENTIALS")
# What bubblewrap (`bwrap --unshare-all`, sarmerge/evaluate/sandbox.py) needs inside a container: Docker's default
# seccomp profile refuses unshare(CLONE_NEWUSER) and mount(), its AppArmor profile refuses mount(), and its masked
# /proc paths make mounting a fresh /proc in the sandbox fail (the API form of `--security-opt systempaths=unconfined`,
# which the docker CLI translates client-side: empty HostConfig MaskedPaths and ReadonlyPaths). No capability is
# added: bwrap runs unprivileged, in a user namespace of its own, and drops every capability before the program starts.
DOCKER_SANDBOX_SECURITY_OPT = ("seccomp=unconfined", "apparmor=unconfined")


def is_secret_env(name: str) -> bool:
    return _SECRET_ENV.fullmatch(name) is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_env_names(names: list[str] | dict[str, str]) -> None:
    for name in names:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")


class DockerCfg(_Strict):
    url: str = Field("", description="Docker API endpoint: unix:///path/to.sock or tcp://host:2376 (empty: "
                                     "$DOCKER_HOST, else unix:///var/run/docker.sock)")
    network_mode: str = Field("host", description="host: steps reach MLflow on the worker's loopback address")
    user: str = Field("worker", description="uid:gid the steps run as: `worker` (the Airflow worker's own, so files "
                                            "on the shared pipeline root keep one owner), `image` (the image's "
                                            "non-root user), or explicit `1000:1000`")
    pull: Literal["missing", "always", "never"] = Field("missing", description="when to pull the image")
    cache_dir: str = Field("", description="host folder mounted at /cache (HF_HOME, XDG_CACHE_HOME, matplotlib); "
                                           "empty: <pipeline root>/cache/containers")
    mounts: list[str] = Field(default_factory=list, description="extra bind mounts `host:container[:ro]`")
    shm_size: str = Field("2g", description="/dev/shm of each container (data loaders, vLLM)")
    mem_limit: str = Field("", description="memory limit per container (empty: none)")
    auto_remove: Literal["never", "success", "force"] = "success"
    timeout_s: int = Field(120, gt=0, description="Docker API call timeout")

    @field_validator("mounts")
    @classmethod
    def _mount_syntax(cls, v: list[str]) -> list[str]:
        for m in v:
            parts = m.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or not parts[0].startswith("/") or \
                    not parts[1].startswith("/") or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"mount {m!r}: expected /host/path:/container/path[:ro|rw]")
        return v

    @property
    def resolved_url(self) -> str:
        return os.environ.get("DOCKER_HOST") or self.url or "unix:///var/run/docker.sock"


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class SecretEnv(_Strict):
    """One secret as environment: the whole secret (`secret` alone → envFrom) or one key as one variable."""

    secret: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    env: str | None = Field(None, description="variable name (with `key`); absent: every key of the secret")
    key: str | None = None

    @field_validator("env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None:
            _check_env_names([v])
        return v

    @model_validator(mode="after")
    def _env_with_key(self) -> SecretEnv:
        if (self.env is None) != (self.key is None):
            raise ValueError(f"secret {self.secret!r}: give both `env` and `key` (one variable) or neither (envFrom)")
        return self


class Resources(_Strict):
    cpu: str = "2"
    memory: str = "8Gi"

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        if not _QUANTITY.fullmatch(str(v)):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 2, 500m, 8Gi)")
        return str(v)


class KubernetesCfg(_Strict):
    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    in_cluster: bool = Field(True, description="the Airflow workers run inside the cluster (else config_file)")
    config_file: str = Field("", description="kubeconfig when not in_cluster (empty: ~/.kube/config)")
    cluster_context: str = ""
    service_account: str = ""
    run_as_user: int = Field(1000, ge=0, description="uid (and gid, fsGroup) of the step containers: the image's "
                                                    "non-root user; files on the pipeline volume get this owner")
    pipeline_claim: str = Field("sarmerge-pipeline", description="PersistentVolumeClaim (ReadWriteMany) holding the "
                                                                "pipeline root, mounted at the same path as on "
                                                                "the workers")
    cache_claim: str = Field("", description="PVC mounted at /cache (model and tokenizer caches); empty: emptyDir")
    params_configmap: str = Field("", description="ConfigMap with key params.yaml, mounted for the steps; "
                                                 "empty: params.yaml must lie on the pipeline volume")
    node_selector: dict[str, str] = Field(default_factory=dict, description="every step's pods")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="GPU steps' pods (added)")
    tolerations: list[Toleration] = Field(default_factory=list)
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")])
    resources: Resources = Field(default_factory=Resources, description="requests = limits of CPU steps")
    gpu_resources: Resources = Field(default_factory=lambda: Resources(cpu="8", memory="64Gi"))
    secrets: list[SecretEnv] = Field(default_factory=list, description="environment from Kubernetes secrets "
                                                                       "(MLflow credentials, S3 keys for DVC)")
    secret_name: str = Field("sarmerge-credentials", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$|^$",
                             description="Secret holding the credentials among containers.pass_env (MLFLOW_TRACKING_"
                                         "TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_*, …), one key per variable name: pods "
                                         "reference it (secretKeyRef, optional) instead of receiving the worker's "
                                         "values; empty: such variables are not passed to pods at all")
    image_pull_secrets: list[str] = Field(default_factory=list)
    startup_timeout_s: int = Field(600, gt=0, description="pod scheduling + image pull allowance")
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def resolved_namespace(self) -> str:
        return os.environ.get("SARMERGE_K8S_NAMESPACE") or self.namespace


class ContainersCfg(_Strict):
    cpu_image: str = Field("sarmerge-cpu:latest", description="image of steps without a GPU (docker/Dockerfile.cpu)")
    gpu_image: str = Field("sarmerge-cuda:latest", description="image of GPU steps (docker/Dockerfile.cuda)")
    gpu_tasks: list[str] = Field(default_factory=list, description="task ids run as GPU steps besides those the "
                                                                   "DAG marks (e.g. evaluate, evaluate_inputs)")
    gpus_per_step: int = Field(1, ge=0, description="GPUs each GPU step requests; 0: GPU steps run without one "
                                                    "(a CPU-only Docker host)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of every step container")
    task_env: dict[str, dict[str, str]] = Field(default_factory=dict, description="task id → extra environment "
                                                                                  "(e.g. SARMERGE_PYTHON of vLLM)")
    pass_env: list[str] = Field(
        default_factory=lambda: ["MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME",
                                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "SARMERGE_THREADS",
                                 "OMP_NUM_THREADS", "SARMERGE_VERBOSE"],
        description="worker environment variables forwarded to the steps when set (private: not shown in the UI)")
    sandbox: Literal["isolated", "runtime-default"] = Field(
        "isolated", description="isolated: the step containers get what bubblewrap needs to isolate model-written "
                                "code (docker: security_opt seccomp/apparmor/systempaths unconfined; kubernetes: a "
                                "user-namespaced pod, hostUsers false, Unconfined seccomp/AppArmor, unmasked /proc); "
                                "runtime-default: the runtime's defaults, where the sandbox cannot isolate and code "
                                "suites refuse to run unless evaluate.allow_unisolated")
    docker: DockerCfg = Field(default_factory=DockerCfg)
    kubernetes: KubernetesCfg = Field(default_factory=KubernetesCfg)

    @field_validator("env", "pass_env")
    @classmethod
    def _names(cls, v: list[str] | dict[str, str]) -> list[str] | dict[str, str]:
        _check_env_names(v)
        return v

    def image(self, gpu: bool) -> tuple[str, str]:
        """(image, the setting it came from) for a GPU or CPU step."""
        if gpu:
            return os.environ.get("SARMERGE_GPU_IMAGE") or self.gpu_image, \
                "containers.gpu_image (or $SARMERGE_GPU_IMAGE)"
        return os.environ.get("SARMERGE_CPU_IMAGE") or self.cpu_image, "containers.cpu_image (or $SARMERGE_CPU_IMAGE)"
