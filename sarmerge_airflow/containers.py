"""The `docker` and `kubernetes` branches of the runner switch (sarmerge_airflow/runner.py, SPEC §8 Containers).

A step is `python -m <module> <args>`; in a container it is `sarmerge-step <module> <args>` (docker/sarmerge-step) in
the project's image: `containers.cpu_image`, or `containers.gpu_image` for GPU steps (those the DAG marks `gpu=True`
plus `containers.gpu_tasks`). Both runners give the container what the local runner's subprocess has:

- the pipeline root, mounted at the same absolute path (steps pass absolute paths to each other), read-write;
- the DAG's params.yaml ($SARMERGE_PARAMS), and $SARMERGE_PIPELINE_ROOT as resolved on the worker;
- a cache folder at /cache (HF_HOME, XDG_CACHE_HOME, MPLCONFIGDIR);
- the worker's MLflow settings (`containers.pass_env`, forwarded at task start, never stored in the DAG).

Credentials never become plain values of a pod spec or of the serialized DAG (SPEC §11): on Kubernetes, the
credential-like names of `containers.pass_env` (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_*, …:
tasks.containers.is_secret_env) are `secretKeyRef`s into the Secret `containers.kubernetes.secret_name` (one key per
variable, optional), and a credential-like name in `containers.env`/`task_env` is refused; on Docker they travel as
the operator's private environment. With `containers.sandbox: isolated` (the default) the containers get what
bubblewrap needs to isolate model-written code: Docker `security_opt` seccomp/apparmor unconfined and an unmasked
/proc (`systempaths=unconfined`; no capability added), Kubernetes a user-namespaced pod (`hostUsers: false`) whose
step container has Unconfined seccomp and AppArmor profiles, an unmasked /proc, no privilege escalation and no
capabilities.

GPU steps request GPUs: Docker `device_requests` (`--gpus N`), Kubernetes `nvidia.com/gpu` limits with the GPU node
selector and tolerations. Configuration errors are caught when the DAG is parsed (unknown runner, empty image, a
malformed setting) or when the task starts (no Docker socket, image absent), each naming the setting to fix.

Provider imports happen inside the builders: a DAG on the local runner never imports docker-py or the Kubernetes
client.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sarmerge.layout import RESULT_PREFIX
from tasks.containers import DOCKER_SANDBOX_SECURITY_OPT, ContainersCfg, is_secret_env
from tasks.params import Params, params_path

CACHE_MOUNT = "/cache"
STEP_ENTRYPOINT = "sarmerge-step"
_URL_RE = re.compile(r"^(unix|tcp|ssh|http|https|npipe)://.+")


class ContainerConfigError(ValueError):
    """A container runner setting is missing or invalid (raised while the DAG is parsed)."""


def parse_result(lines: Sequence[str]) -> Any:
    """The result a step printed (its last SARMERGE_RESULT line), or None. Container logs interleave stdout and
    stderr by write, so an unterminated stderr write (a progress bar) may precede the result on its line."""
    import json

    for line in reversed(lines):
        at = line.find(RESULT_PREFIX)
        if at >= 0:
            return json.loads(line[at + len(RESULT_PREFIX):])
    return None


def last_line(lines: Sequence[Any]) -> str:
    for line in reversed(lines or []):
        text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
        if text.strip():
            return text.strip()
    return ""


def is_gpu_step(cfg: ContainersCfg, task_id: str, gpu: bool) -> bool:
    return gpu or task_id in cfg.gpu_tasks


def step_image(cfg: ContainersCfg, gpu: bool, runner: str) -> str:
    image, setting = cfg.image(gpu)
    if not image.strip():
        raise ContainerConfigError(f"{setting} is empty: pipeline.runner {runner!r} needs an image for its "
                                   f"{'GPU' if gpu else 'CPU'} steps (build one from docker/Dockerfile."
                                   f"{'cuda' if gpu else 'cpu'})")
    return image


def step_environment(params: Params, task_id: str, params_file: str) -> dict[str, str]:
    """Environment every step container gets (no credentials: those are forwarded or come from secrets)."""
    cfg = params.containers
    return {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SARMERGE_PIPELINE_ROOT": str(params.root),
        "SARMERGE_PARAMS": params_file,
        "HF_HOME": f"{CACHE_MOUNT}/huggingface",
        "XDG_CACHE_HOME": CACHE_MOUNT,
        "MPLCONFIGDIR": f"{CACHE_MOUNT}/matplotlib",
        "HF_HUB_OFFLINE": "1",  # nothing downloads models at run time (checkpoints come from the registry)
        **cfg.env,
        **cfg.task_env.get(task_id, {}),
    }


def forwarded_env(names: Sequence[str]) -> dict[str, str]:
    return {k: os.environ[k] for k in names if k in os.environ}


def split_secret_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain variables, credential-like ones)."""
    plain = {k: v for k, v in env.items() if not is_secret_env(k)}
    return plain, {k: v for k, v in env.items() if is_secret_env(k)}


# -- docker ------------------------------------------------------------------------------------------------------------
def docker_url(params: Params) -> str:
    url = params.containers.docker.resolved_url
    if not _URL_RE.match(url):
        raise ContainerConfigError(f"containers.docker.url (or $DOCKER_HOST) = {url!r}: expected unix:///path/to.sock "
                                   "or tcp://host:port")
    return url


def docker_mounts(params: Params) -> list[dict[str, Any]]:
    """Bind mounts (docker.types.Mount keyword dicts): pipeline root, params file, cache, extra mounts."""
    cfg = params.containers.docker
    root = params.root
    mounts = [{"source": str(root), "target": str(root), "type": "bind", "read_only": False}]
    pfile = params_path().resolve()
    if not pfile.is_relative_to(root):
        mounts.append({"source": str(pfile), "target": str(pfile), "type": "bind", "read_only": True})
    cache = Path(cfg.cache_dir) if cfg.cache_dir else root / "cache" / "containers"
    mounts.append({"source": str(cache), "target": CACHE_MOUNT, "type": "bind", "read_only": False})
    for m in cfg.mounts:
        src, dst, *mode = m.split(":")
        mounts.append({"source": src, "target": dst, "type": "bind", "read_only": mode == ["ro"]})
    return mounts


def docker_kwargs(params: Params, *, task_id: str, gpu: bool) -> dict[str, Any]:
    """DockerOperator keyword arguments of one step, from `containers:` (validated here, at DAG parse time)."""
    cfg = params.containers
    gpu = is_gpu_step(cfg, task_id, gpu)
    # credentials of containers.env go in the private environment: not a template field, not in the DAG's record
    environment, private = split_secret_env(step_environment(params, task_id, str(params_path().resolve())))
    kwargs: dict[str, Any] = {
        "image": step_image(cfg, gpu, "docker"),
        "docker_url": docker_url(params),
        "mounts": docker_mounts(params),
        "environment": environment,
        "private_environment": private,
        "security_opt": list(DOCKER_SANDBOX_SECURITY_OPT) if cfg.sandbox == "isolated" else [],
        "unmask_proc": cfg.sandbox == "isolated",
        "pass_env": list(cfg.pass_env),
        "run_as": cfg.docker.user,
        "pull": cfg.docker.pull,
        "network_mode": cfg.docker.network_mode or None,
        "shm_size": _bytes(cfg.docker.shm_size, "containers.docker.shm_size") if cfg.docker.shm_size else None,
        "mem_limit": cfg.docker.mem_limit or None,
        "auto_remove": cfg.docker.auto_remove,
        "timeout": cfg.docker.timeout_s,
        "gpus": cfg.gpus_per_step if gpu else 0,
        "gpu_step": gpu,
        "mount_tmp_dir": False,
        "labels": {"sarmerge.task": task_id},
    }
    if cfg.docker.user not in ("worker", "image") and not re.fullmatch(r"[0-9]+(:[0-9]+)?|[a-z_][a-z0-9_-]*",
                                                                        cfg.docker.user):
        raise ContainerConfigError(f"containers.docker.user = {cfg.docker.user!r}: expected worker, image, "
                                   "uid[:gid] or a user name")
    return kwargs


def _bytes(size: str, setting: str) -> int:
    m = re.fullmatch(r"([0-9]+)([kmg]?)b?", size.strip().lower())
    if not m:
        raise ContainerConfigError(f"{setting} = {size!r}: expected a size like 512m or 2g")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


# -- kubernetes --------------------------------------------------------------------------------------------------------
PARAMS_MOUNT = "/etc/sarmerge"


def kubernetes_kwargs(params: Params, *, task_id: str, gpu: bool) -> dict[str, Any]:
    """KubernetesPodOperator keyword arguments of one step, from `containers:` (no cluster is contacted)."""
    from kubernetes.client import models as k8s

    cfg = params.containers
    kc = cfg.kubernetes
    gpu = is_gpu_step(cfg, task_id, gpu)
    root = params.root
    pfile = params_path().resolve()
    volumes = [k8s.V1Volume(name="pipeline", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=kc.pipeline_claim))]
    mounts = [k8s.V1VolumeMount(name="pipeline", mount_path=str(root))]
    if kc.cache_claim:
        volumes.append(k8s.V1Volume(name="cache", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=kc.cache_claim)))
    else:
        volumes.append(k8s.V1Volume(name="cache", empty_dir=k8s.V1EmptyDirVolumeSource()))
    mounts.append(k8s.V1VolumeMount(name="cache", mount_path=CACHE_MOUNT))
    if kc.params_configmap:
        volumes.append(k8s.V1Volume(name="params", config_map=k8s.V1ConfigMapVolumeSource(name=kc.params_configmap)))
        mounts.append(k8s.V1VolumeMount(name="params", mount_path=PARAMS_MOUNT, read_only=True))
        params_file = f"{PARAMS_MOUNT}/params.yaml"
    elif pfile.is_relative_to(root):
        params_file = str(pfile)
    else:
        raise ContainerConfigError(
            f"containers.kubernetes.params_configmap is empty and the DAG's params file {pfile} is not on the "
            f"pipeline volume ({root}): pods could not read it. Create a ConfigMap from it (kubectl create configmap "
            f"sarmerge-params --from-file=params.yaml) and name it there, or set $SARMERGE_PARAMS to a file under "
            f"the pipeline root")
    if not kc.pipeline_claim:
        raise ContainerConfigError("containers.kubernetes.pipeline_claim is empty: steps share the pipeline root "
                                   "through a ReadWriteMany PersistentVolumeClaim")
    resources = kc.gpu_resources if gpu else kc.resources
    quantities = {"cpu": resources.cpu, "memory": resources.memory}
    limits = dict(quantities)
    if gpu and cfg.gpus_per_step:
        limits["nvidia.com/gpu"] = str(cfg.gpus_per_step)
    plain, secret = split_secret_env(step_environment(params, task_id, params_file))
    if secret:
        raise ContainerConfigError(
            f"containers.env / containers.task_env: {sorted(secret)} look like credentials, and a pod spec shows its "
            f"values to anyone who can read pods. Put them in the Kubernetes Secret containers.kubernetes.secret_name "
            f"({kc.secret_name or 'unset'}) under those keys and list them in containers.pass_env, or name them in "
            f"containers.kubernetes.secrets")
    env = [k8s.V1EnvVar(name=k, value=v) for k, v in plain.items()]
    env_from = []
    for s in kc.secrets:
        if s.env:
            env.append(k8s.V1EnvVar(name=s.env, value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=s.secret, key=s.key))))
        else:
            env_from.append(k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s.secret)))
    # the worker's credentials are not copied into the pod: the pod reads them from the Secret (absent keys: unset)
    present = {e.name for e in env}
    secret_pass = [n for n in cfg.pass_env if is_secret_env(n)]
    if kc.secret_name:
        env += [k8s.V1EnvVar(name=n, value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(
                    name=kc.secret_name, key=n, optional=True))) for n in secret_pass if n not in present]
    isolated = cfg.sandbox == "isolated"
    container_security = k8s.V1SecurityContext(
        allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
        run_as_non_root=kc.run_as_user != 0,
        # bubblewrap's namespaces and mounts (sarmerge/evaluate/sandbox.py): the runtime's default seccomp and
        # AppArmor profiles refuse unshare/mount, and a masked /proc cannot be mounted afresh inside the sandbox
        seccomp_profile=k8s.V1SeccompProfile(type="Unconfined" if isolated else "RuntimeDefault"),
        app_armor_profile=k8s.V1AppArmorProfile(type="Unconfined") if isolated else None,
        proc_mount="Unmasked" if isolated else None)
    tolerations = [k8s.V1Toleration(**t.model_dump(exclude_none=True))
                   for t in [*kc.tolerations, *(kc.gpu_tolerations if gpu else [])]]
    node_selector = {**kc.node_selector, **(kc.gpu_node_selector if gpu else {})}
    kwargs: dict[str, Any] = {
        "image": step_image(cfg, gpu, "kubernetes"),
        "namespace": kc.resolved_namespace,
        "name": "sarmerge-" + re.sub(r"[^a-z0-9-]+", "-", task_id.lower()).strip("-"),
        "cmds": [STEP_ENTRYPOINT],
        "env_vars": env,
        "env_from": env_from,
        "pass_env": [n for n in cfg.pass_env if not is_secret_env(n)],
        # a pod of its own user namespace: root or capabilities inside it are nobody on the node
        "host_users": False if isolated else None,
        "container_security_context": container_security,
        "volumes": volumes,
        "volume_mounts": mounts,
        "container_resources": k8s.V1ResourceRequirements(requests=quantities, limits=limits),
        "node_selector": node_selector or None,
        "tolerations": tolerations or None,
        "labels": {"app.kubernetes.io/name": "sarmerge", "sarmerge/task": re.sub(r"[^A-Za-z0-9_.-]", "-", task_id),
                   **kc.labels},
        "security_context": k8s.V1PodSecurityContext(run_as_user=kc.run_as_user, run_as_group=kc.run_as_user,
                                                     fs_group=kc.run_as_user, run_as_non_root=kc.run_as_user != 0),
        "service_account_name": kc.service_account or None,
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=n) for n in kc.image_pull_secrets] or None,
        "in_cluster": kc.in_cluster,
        "config_file": kc.config_file or None,
        "cluster_context": kc.cluster_context or None,
        "startup_timeout_seconds": kc.startup_timeout_s,
        "get_logs": True,
        "do_xcom_push": True,
        "on_finish_action": "delete_succeeded_pod",
    }
    return kwargs


# -- the builders runner.py dispatches to ------------------------------------------------------------------------------
def build(kind: str, params: Params, *, task_id: str, module: str, gpu: bool, mapped_args: Any = None,
          **kwargs: Any) -> Any:
    """One operator (or a mapped one over `mapped_args`) running `module` through the `kind` container runner."""
    if kind == "docker":
        from sarmerge_airflow.docker_step import StepDockerOperator as op_class

        settings = docker_kwargs(params, task_id=task_id, gpu=gpu)
    elif kind == "kubernetes":
        from sarmerge_airflow.pod_step import StepPodOperator as op_class  # type: ignore[assignment]

        settings = kubernetes_kwargs(params, task_id=task_id, gpu=gpu)
    else:  # runner.py only dispatches known kinds
        raise ContainerConfigError(f"pipeline.runner = {kind!r}: not a container runner")
    if mapped_args is not None:
        return op_class.partial(task_id=task_id, module=module, **settings, **kwargs).expand(args=mapped_args)
    return op_class(task_id=task_id, module=module, **settings, **kwargs)
