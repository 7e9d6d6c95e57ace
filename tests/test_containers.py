"""Container runners (SPEC §8 Containers): KubernetesPodOperator pod specs rendered and validated without a cluster,
DockerOperator construction for GPU and CPU steps, configuration errors naming their setting, the Dockerfiles linted.

The real-container tier (`-m containers`, needs podman and the CPU image: `bash scripts/containers.sh build`) lives
in tests/test_containers_real.py.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("airflow.providers.docker")
pytest.importorskip("airflow.providers.cncf.kubernetes")

from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from sarmerge.errors import SarmergeError
from tasks.params import REPO_ROOT, Params, parse_params

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean runner environment: params file in tmp_path, no overrides leaking in from the shell."""
    for var in ("SARMERGE_RUNNER", "SARMERGE_CPU_IMAGE", "SARMERGE_GPU_IMAGE", "DOCKER_HOST", "SARMERGE_K8S_NAMESPACE",
                "SARMERGE_PIPELINE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "pipeline"
    pfile = root / "params.yaml"  # on the pipeline volume, so pods can read it without a ConfigMap
    root.mkdir()
    pfile.write_text((REPO_ROOT / "params.yaml").read_text())
    monkeypatch.setenv("SARMERGE_PARAMS", str(pfile))
    monkeypatch.setenv("SARMERGE_PIPELINE_ROOT", str(root))
    return root


def make_params(runner: str, containers: dict[str, Any] | None = None) -> Params:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["pipeline"]["runner"] = runner
    raw["containers"] = containers or {}
    return parse_params(raw, source="test params")


def build(params: Params, task_id: str, module: str, args: list[str], *, gpu: bool = False, **kwargs: Any) -> Any:
    from airflow.sdk import DAG

    from sarmerge_airflow.runner import Runner

    with DAG(f"t_{task_id}", schedule=None):
        return Runner(params).step(task_id, module, args, gpu=gpu, **kwargs)


def render(op: Any) -> dict[str, Any]:
    """The pod the operator would create, as the JSON the API server receives."""
    pod = op.build_pod_request_obj(dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def validated(pod_json: dict[str, Any]) -> k8s.V1Pod:
    """Round trip through the Kubernetes client's own models: required fields and types are checked there."""

    class _Response:
        data = __import__("json").dumps(pod_json)

    pod = ApiClient().deserialize(_Response(), "V1Pod")
    assert isinstance(pod, k8s.V1Pod)
    return pod


K8S_CFG = {
    "cpu_image": "registry.example/sarmerge-cpu:1.0",
    "gpu_image": "registry.example/sarmerge-cuda:1.0",
    "kubernetes": {
        "namespace": "ml-pipelines",
        "pipeline_claim": "sarmerge-pipeline",
        "cache_claim": "hf-cache",
        "node_selector": {"pool": "sarmerge"},
        "gpu_node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "resources": {"cpu": "2", "memory": "8Gi"},
        "gpu_resources": {"cpu": "8", "memory": "64Gi"},
        "secrets": [{"secret": "mlflow-credentials"},
                    {"secret": "dvc-s3", "env": "AWS_SECRET_ACCESS_KEY", "key": "secret-key"}],
        "image_pull_secrets": ["regcred"],
        "service_account": "sarmerge-steps",
    },
}


# -- kubernetes: pod specs -----------------------------------------------------------------------------------------
def test_gpu_step_pod_requests_a_gpu_on_gpu_nodes(env: Path) -> None:
    params = make_params("kubernetes", K8S_CFG)
    op = build(params, "fisher", "tasks.fisher", ["--workspace", str(env / "ws"), "--parent", "math_s0"], gpu=True)
    pod = render(op)
    validated(pod)
    spec = pod["spec"]
    step = next(c for c in spec["containers"] if c["name"] == "base")
    assert step["image"] == "registry.example/sarmerge-cuda:1.0"
    assert step["command"] == ["sarmerge-step"]
    assert step["args"] == ["tasks.fisher", "--workspace", str(env / "ws"), "--parent", "math_s0"]
    assert step["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert step["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert spec["nodeSelector"] == {"pool": "sarmerge", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in spec["tolerations"]
    assert pod["metadata"]["namespace"] == "ml-pipelines"
    assert DNS1123_LABEL.match(pod["metadata"]["name"]) and len(pod["metadata"]["name"]) <= 63


def test_cpu_step_pod_has_no_gpu_and_no_gpu_scheduling(env: Path) -> None:
    params = make_params("kubernetes", K8S_CFG)
    pod = render(build(params, "merge", "tasks.merge", ["--workspace", "/w", "--method", "sar"]))
    validated(pod)
    step = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
    assert step["image"] == "registry.example/sarmerge-cpu:1.0"
    assert step["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert "nvidia.com/gpu" not in step["resources"]["requests"]
    assert pod["spec"]["nodeSelector"] == {"pool": "sarmerge"}
    assert all(t.get("key") != "nvidia.com/gpu" for t in pod["spec"]["tolerations"])


def test_pod_volumes_env_from_secrets_and_security(env: Path) -> None:
    params = make_params("kubernetes", K8S_CFG)
    pod = render(build(params, "analyze", "tasks.analyze", ["--workspace", "/w"]))
    spec = pod["spec"]
    step = next(c for c in spec["containers"] if c["name"] == "base")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pipeline"]["persistentVolumeClaim"] == {"claimName": "sarmerge-pipeline"}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    mounts = {m["name"]: m["mountPath"] for m in step["volumeMounts"]}
    # steps pass absolute paths under the pipeline root to each other: mounted where the workers see it
    assert mounts["pipeline"] == str(env)
    assert mounts["cache"] == "/cache"
    assert mounts["xcom"] == "/airflow/xcom"  # the XCom sidecar reads the step's result there
    env_vars = {e["name"]: e for e in step["env"]}
    assert env_vars["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "dvc-s3", "key": "secret-key"}}
    assert "value" not in env_vars["AWS_SECRET_ACCESS_KEY"]
    assert step["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    assert env_vars["SARMERGE_PIPELINE_ROOT"]["value"] == str(env)
    assert env_vars["SARMERGE_PARAMS"]["value"] == str(env / "params.yaml")
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    assert spec["serviceAccountName"] == "sarmerge-steps"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["restartPolicy"] == "Never"


def test_params_from_configmap_when_the_file_is_off_the_volume(env: Path, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    elsewhere = tmp_path / "etc" / "params.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text((REPO_ROOT / "params.yaml").read_text())
    monkeypatch.setenv("SARMERGE_PARAMS", str(elsewhere))
    cfg = {**K8S_CFG, "kubernetes": {**K8S_CFG["kubernetes"], "params_configmap": "sarmerge-params"}}
    pod = render(build(make_params("kubernetes", cfg), "plan", "tasks.plan", ["--events", "[]"]))
    step = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["params"]["configMap"]["name"] == "sarmerge-params"
    assert {"name": "params", "mountPath": "/etc/sarmerge", "readOnly": True} in step["volumeMounts"]
    assert {e["name"]: e.get("value") for e in step["env"]}["SARMERGE_PARAMS"] == "/etc/sarmerge/params.yaml"

    with pytest.raises(ValueError, match=r"containers\.kubernetes\.params_configmap"):
        build(make_params("kubernetes", K8S_CFG), "plan", "tasks.plan", ["--events", "[]"])


def test_gpu_tasks_setting_moves_evaluation_onto_gpus(env: Path) -> None:
    params = make_params("kubernetes", {**K8S_CFG, "gpu_tasks": ["evaluate"], "gpus_per_step": 2})
    pod = render(build(params, "evaluate", "tasks.evaluate", ["--workspace", "/w"]))
    step = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
    assert step["image"].endswith("sarmerge-cuda:1.0")
    assert step["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_mapped_pod_step_expands_over_argument_lists(env: Path) -> None:
    from airflow.sdk import DAG

    from sarmerge_airflow.pod_step import StepPodOperator
    from sarmerge_airflow.runner import Runner

    with DAG("t_mapped", schedule=None):
        arg_lists = [["--workspace", "/w", "--method", "sar"], ["--workspace", "/w", "--method", "ties"]]
        mapped = Runner(make_params("kubernetes", K8S_CFG)).mapped("merge", "tasks.merge", arg_lists)
    assert mapped.operator_class is StepPodOperator
    assert mapped.partial_kwargs["image"] == "registry.example/sarmerge-cpu:1.0"
    assert mapped.expand_input.value["args"][1][-1] == "ties"


def test_step_entrypoint_hands_the_result_to_the_xcom_sidecar(tmp_path: Path) -> None:
    """docker/sarmerge-step runs `python -m MODULE ARGS`, passes stdout through, writes the result line's JSON where
    KubernetesPodOperator's sidecar reads it, and keeps the step's exit status."""
    (tmp_path / "probe_step.py").write_text(
        "import sys\nprint('working')\nprint('SARMERGE_RESULT {\"a\": 1}')\nprint('SARMERGE_RESULT {\"merged\": "
        "[\"x\"]}')\nprint('after')\nsys.exit(int(sys.argv[1]))\n")
    xcom = tmp_path / "xcom"
    xcom.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "SARMERGE_PYTHON": sys.executable,
           "SARMERGE_XCOM_DIR": str(xcom)}
    entry = str(REPO_ROOT / "docker" / "sarmerge-step")
    ok = subprocess.run([entry, "probe_step", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "working" and ok.stdout.splitlines()[-1] == "after"
    assert __import__("json").loads((xcom / "return.json").read_text()) == {"merged": ["x"]}
    failed = subprocess.run([entry, "probe_step", "3"], env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 3
    # without the XCom folder (DockerOperator) the step runs directly and nothing is written
    (xcom / "return.json").unlink()
    xcom.rmdir()
    direct = subprocess.run([entry, "probe_step", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert direct.returncode == 0 and "SARMERGE_RESULT" in direct.stdout and not xcom.exists()


# -- docker: operator construction ---------------------------------------------------------------------------------
DOCKER_CFG = {"cpu_image": "localhost/sarmerge-cpu:test", "gpu_image": "localhost/sarmerge-cuda:test",
              "docker": {"url": "unix:///run/test-docker.sock", "cache_dir": "/var/cache/sarmerge",
                         "mounts": ["/data/models:/models:ro"]}}


def test_docker_gpu_step_requests_a_gpu_device(env: Path) -> None:
    op = build(make_params("docker", DOCKER_CFG), "fisher", "tasks.fisher", ["--workspace", "/w"], gpu=True)
    assert op.image == "localhost/sarmerge-cuda:test"
    assert op.docker_url == "unix:///run/test-docker.sock"
    assert len(op.device_requests) == 1
    request = op.device_requests[0]
    assert request["Count"] == 1 and request["Capabilities"] == [["gpu"]]
    assert op.step_command() == ["sarmerge-step", "tasks.fisher", "--workspace", "/w"]


def test_docker_cpu_step_mounts_workspace_params_and_caches(env: Path) -> None:
    op = build(make_params("docker", DOCKER_CFG), "merge", "tasks.merge", ["--workspace", "/w", "--method", "sar"])
    assert op.image == "localhost/sarmerge-cpu:test"
    assert not op.device_requests
    mounts = {m["target"]: m for m in op.mounts}
    assert mounts[str(env)]["source"] == str(env) and not mounts[str(env)]["read_only"]
    assert mounts["/cache"]["source"] == "/var/cache/sarmerge"
    assert mounts["/models"] == {"source": "/data/models", "target": "/models", "type": "bind", "read_only": True}
    assert op.environment["SARMERGE_PIPELINE_ROOT"] == str(env)
    assert op.environment["SARMERGE_PARAMS"] == str(env / "params.yaml")
    assert op.environment["HF_HOME"] == "/cache/huggingface"
    # credentials are never part of the DAG: forwarded from the worker when the task starts
    assert "MLFLOW_TRACKING_URI" in op.pass_env and "MLFLOW_TRACKING_URI" not in op.environment
    assert op.network_mode == "host"


def test_docker_settings_come_from_the_environment_too(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://gpu-host:2376")
    monkeypatch.setenv("SARMERGE_GPU_IMAGE", "registry.example/sarmerge-cuda:2.0")
    op = build(make_params("docker", {**DOCKER_CFG, "gpus_per_step": 0}), "fisher", "tasks.fisher", [], gpu=True)
    assert op.docker_url == "tcp://gpu-host:2376"
    assert op.image == "registry.example/sarmerge-cuda:2.0"
    assert not op.device_requests  # gpus_per_step 0: a CPU-only Docker host runs GPU steps without a device


def test_docker_params_file_off_the_root_is_mounted_read_only(env: Path, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    elsewhere = tmp_path / "conf" / "params.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("x: 1\n")
    monkeypatch.setenv("SARMERGE_PARAMS", str(elsewhere))
    op = build(make_params("docker", DOCKER_CFG), "plan", "tasks.plan", [])
    mounts = {m["target"]: m for m in op.mounts}
    assert mounts[str(elsewhere)]["read_only"] is True


def test_result_line_is_found_in_interleaved_container_logs() -> None:
    from sarmerge_airflow.containers import parse_result

    logs = ["loading", 'SARMERGE_RESULT {"old": 1}', 'merging 40%|####  \rSARMERGE_RESULT {"merged": "/w/out"}',
            "WARNING stderr after the result"]
    assert parse_result(logs) == {"merged": "/w/out"}
    assert parse_result(["no result here"]) is None


# -- configuration errors ----------------------------------------------------------------------------------------------
def test_unknown_runner_names_the_setting(env: Path) -> None:
    with pytest.raises(ValueError, match=r"pipeline\.runner.*'podman'.*docker, kubernetes, local"):
        build(make_params("podman"), "plan", "tasks.plan", [])


@pytest.mark.parametrize("runner", ["docker", "kubernetes"])
def test_empty_image_names_the_setting(env: Path, runner: str) -> None:
    cfg = {**K8S_CFG, "cpu_image": ""} if runner == "kubernetes" else {**DOCKER_CFG, "cpu_image": " "}
    with pytest.raises(ValueError, match=r"containers\.cpu_image \(or \$SARMERGE_CPU_IMAGE\) is empty"):
        build(make_params(runner, cfg), "merge", "tasks.merge", [])
    cfg["gpu_image"] = ""
    with pytest.raises(ValueError, match=r"containers\.gpu_image \(or \$SARMERGE_GPU_IMAGE\) is empty"):
        build(make_params(runner, {**cfg, "cpu_image": "x"}), "fisher", "tasks.fisher", [], gpu=True)


def test_bad_docker_url_names_the_setting(env: Path) -> None:
    with pytest.raises(ValueError, match=r"containers\.docker\.url \(or \$DOCKER_HOST\) = '/var/run/docker.sock'"):
        build(make_params("docker", {"docker": {"url": "/var/run/docker.sock"}}), "merge", "tasks.merge", [])


@pytest.mark.parametrize(("section", "field"), [
    ({"docker": {"mounts": ["relative:/x"]}}, "containers.docker.mounts"),
    ({"docker": {"pull": "sometimes"}}, "containers.docker.pull"),
    ({"kubernetes": {"resources": {"cpu": "two", "memory": "8Gi"}}}, "containers.kubernetes.resources.cpu"),
    ({"kubernetes": {"secrets": [{"secret": "s3", "env": "AWS_KEY"}]}}, "containers.kubernetes.secrets.0"),
    ({"gpus_per_step": -1}, "containers.gpus_per_step"),
    ({"imagez": "x"}, "containers.imagez"),
])
def test_malformed_container_settings_fail_validation(section: dict[str, Any], field: str) -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["containers"] = section
    with pytest.raises(SarmergeError, match=re.escape(f"field '{field}'")):
        parse_params(raw, source="params.yaml")


def test_missing_socket_fails_at_task_start_naming_the_setting(env: Path, tmp_path: Path) -> None:
    """A real execute() against a socket path with nothing behind it: the task fails (no retry) naming the setting."""
    from airflow.sdk.exceptions import AirflowFailException

    sock = tmp_path / "no-engine.sock"
    op = build(make_params("docker", {**DOCKER_CFG, "docker": {"url": f"unix://{sock}"}}), "merge", "tasks.merge", [])
    with pytest.raises(AirflowFailException, match=rf"containers\.docker\.url \(or \$DOCKER_HOST\) = unix://{sock}: "
                                                   "no Docker API socket"):
        op.execute({})
    # a socket file with no engine answering it: the same setting is named
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.close()  # the file stays; connections are refused
    with pytest.raises(AirflowFailException, match=r"containers\.docker\.url .* does not answer"):
        op.execute({})


# -- images ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_are_hadolint_clean(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (pip install -c constraints.txt -e '.[dev]')")
    proc = subprocess.run([hadolint, "--no-color", str(REPO_ROOT / "docker" / dockerfile)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_share_constraints_run_non_root_and_bake_no_secrets(dockerfile: str) -> None:
    text = (REPO_ROOT / "docker" / dockerfile).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M) and re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert "-c constraints.txt" in text and "COPY constraints.txt" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0", "0:0")
    for line in re.findall(r"^(?:ARG|ENV)\s+(.*)$", text, re.M):
        assert not re.search(r"(?i)(password|token|secret|api_key|access_key)\s*=", line), line
    # CA certificates of a build proxy are bind-mounted, never copied into a layer
    assert not re.search(r"^COPY .*certs", text, re.M)
