"""Secrets and sandbox settings of the pipeline's containers and records (issue 11 items 5 and 8, SPEC §11):
credentials never appear as plain values in a rendered pod spec, in the operator's serialized fields, in a committed
workspace (the lineage repository's git objects are searched) or in recorded URLs; the step containers get what
bubblewrap needs to isolate model-written code, in the rendered specs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.params import REPO_ROOT, Params, parse_params

pytestmark = pytest.mark.pipeline

TOKEN, PASSWORD, AWS_KEY = "tok-3f9a-SECRET", "pw-77c1-SECRET", "aws-0b2e-SECRET"
WORKER_SECRETS = {"MLFLOW_TRACKING_TOKEN": TOKEN, "MLFLOW_TRACKING_PASSWORD": PASSWORD,
                  "AWS_SECRET_ACCESS_KEY": AWS_KEY}


@pytest.fixture
def runner_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("SARMERGE_RUNNER", "SARMERGE_CPU_IMAGE", "SARMERGE_GPU_IMAGE", "DOCKER_HOST", "SARMERGE_K8S_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "pipeline"
    root.mkdir()
    (root / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    monkeypatch.setenv("SARMERGE_PARAMS", str(root / "params.yaml"))
    monkeypatch.setenv("SARMERGE_PIPELINE_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    for k, v in WORKER_SECRETS.items():  # the worker has credentials in its environment
        monkeypatch.setenv(k, v)
    # a kubeconfig that is read (the operator labels pods with in_cluster) but never contacted
    (root / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "users": [{"name": "test", "user": {"token": "kubeconfig-token"}}]}))
    K8S["kubernetes"]["config_file"] = str(root / "kubeconfig")
    return root


def make_params(runner: str, containers: dict[str, Any] | None = None, **sections: Any) -> Params:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["pipeline"]["runner"] = runner
    raw["containers"] = containers or {}
    raw.update(sections)
    return parse_params(raw, source="test params")


K8S = {"cpu_image": "registry.example/sarmerge-cpu:1", "gpu_image": "registry.example/sarmerge-cuda:1",
       "pass_env": ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                    "AWS_SECRET_ACCESS_KEY", "OMP_NUM_THREADS"],
       "kubernetes": {"namespace": "ml", "pipeline_claim": "sarmerge-pipeline", "secret_name": "sarmerge-creds",
                      "in_cluster": False}}


def operator(params: Params, task_id: str = "evaluate", module: str = "tasks.evaluate", gpu: bool = False) -> Any:
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    from airflow.sdk import DAG

    from sarmerge_airflow.runner import Runner

    with DAG(f"t_{task_id}", schedule=None):
        return Runner(params).step(task_id, module, ["--workspace", "/w", "--model", "merged/sar"], gpu=gpu)


def rendered_pod(op: Any) -> dict[str, Any]:
    """The pod as the API server would receive it at task start (dry_run=False: the worker's variables are
    forwarded, the path where plain values used to leak)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context=None, dry_run=False))


def step_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


@pytest.mark.parametrize("gpu", [False, True])
def test_pod_spec_holds_secret_references_never_secret_values(runner_env: Path, gpu: bool) -> None:
    pod = rendered_pod(operator(make_params("kubernetes", K8S), gpu=gpu))
    text = json.dumps(pod)
    for value in WORKER_SECRETS.values():
        assert value not in text
    env = {e["name"]: e for e in step_container(pod)["env"]}
    for name in WORKER_SECRETS:
        assert "value" not in env[name]
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "sarmerge-creds", "key": name, "optional": True}}
    # what is not a credential is still forwarded from the worker as a value
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.internal:5000"


def test_pod_spec_validates_against_the_kubernetes_schema(runner_env: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for gpu in (False, True):
        pod = rendered_pod(operator(make_params("kubernetes", K8S), gpu=gpu))
        # strict: unknown fields (a misspelt securityContext key, say) fail too
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_credentials_in_containers_env_are_refused_for_pods(runner_env: Path) -> None:
    from sarmerge_airflow.containers import ContainerConfigError

    cfg = {**K8S, "env": {"AWS_SECRET_ACCESS_KEY": AWS_KEY, "SARMERGE_THREADS": "2"}}
    with pytest.raises(ContainerConfigError, match=r"containers\.env.*AWS_SECRET_ACCESS_KEY.*secret_name"):
        operator(make_params("kubernetes", cfg))
    cfg = {**K8S, "task_env": {"evaluate": {"HF_TOKEN": "hf-SECRET"}}}
    with pytest.raises(ContainerConfigError, match="HF_TOKEN"):
        operator(make_params("kubernetes", cfg))


def test_without_a_secret_name_credentials_are_not_passed_at_all(runner_env: Path) -> None:
    cfg = {**K8S, "kubernetes": {**K8S["kubernetes"], "secret_name": ""}}
    pod = rendered_pod(operator(make_params("kubernetes", cfg)))
    names = {e["name"] for e in step_container(pod)["env"]}
    assert not names & set(WORKER_SECRETS) and "MLFLOW_TRACKING_URI" in names
    assert not any(v in json.dumps(pod) for v in WORKER_SECRETS.values())


def test_pod_gets_what_bubblewrap_needs_and_nothing_more(runner_env: Path) -> None:
    pod = rendered_pod(operator(make_params("kubernetes", K8S)))
    assert pod["spec"]["hostUsers"] is False  # a user namespace of its own: uid 0 inside is nobody on the node
    ctx = step_container(pod)["securityContext"]
    assert ctx["seccompProfile"] == {"type": "Unconfined"} and ctx["appArmorProfile"] == {"type": "Unconfined"}
    assert ctx["procMount"] == "Unmasked"
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["runAsNonRoot"] is True and "privileged" not in ctx

    plain = rendered_pod(operator(make_params("kubernetes", {**K8S, "sandbox": "runtime-default"})))
    assert "hostUsers" not in plain["spec"]
    ctx = step_container(plain)["securityContext"]
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"} and "procMount" not in ctx


DOCKER = {"cpu_image": "localhost/sarmerge-cpu:test", "docker": {"url": "unix:///run/test-docker.sock"},
          "env": {"AWS_SECRET_ACCESS_KEY": AWS_KEY, "SARMERGE_THREADS": "2"}}


def docker_operator(params: Params) -> Any:
    pytest.importorskip("airflow.providers.docker")
    from airflow.sdk import DAG

    from sarmerge_airflow.runner import Runner

    with DAG("t_docker", schedule=None) as dag:
        op = Runner(params).step("merge", "tasks.merge", ["--workspace", "/w"])
    return op, dag


def test_docker_step_keeps_credentials_out_of_its_visible_fields(runner_env: Path) -> None:
    op, dag = docker_operator(make_params("docker", DOCKER))
    assert "AWS_SECRET_ACCESS_KEY" not in op.environment and op.environment["SARMERGE_THREADS"] == "2"
    assert op._private_environment == {"AWS_SECRET_ACCESS_KEY": AWS_KEY}
    from airflow.serialization.serialized_objects import DagSerialization

    serialized = json.dumps(DagSerialization.to_dict(dag), default=str)
    assert AWS_KEY not in serialized and "SARMERGE_THREADS" in serialized


def test_docker_step_host_config_carries_the_sandbox_security_options(runner_env: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The host config docker-py builds for the container (no engine needed to build it)."""
    import docker
    from sarmerge_airflow.docker_step import StepDockerOperator
    from tasks.containers import DOCKER_SANDBOX_SECURITY_OPT

    client = docker.APIClient(base_url="tcp://127.0.0.1:9", version="1.41")
    monkeypatch.setattr(StepDockerOperator, "cli", property(lambda self: client))
    op, _ = docker_operator(make_params("docker", DOCKER))
    op._add_security_opt()
    op._add_security_opt()  # a second execute() of the same operator: still one set of options
    host_config = client.create_host_config(network_mode="host")
    assert host_config["SecurityOpt"] == list(DOCKER_SANDBOX_SECURITY_OPT) == ["seccomp=unconfined",
                                                                               "apparmor=unconfined"]
    assert host_config["MaskedPaths"] == [] and host_config["ReadonlyPaths"] == []  # /proc unmasked
    assert "CapAdd" not in host_config and not host_config.get("Privileged")

    plain, _ = docker_operator(make_params("docker", {**DOCKER, "sandbox": "runtime-default"}))
    assert plain.security_opt == [] and plain.unmask_proc is False


# -- URLs and committed workspaces ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "stripped"), [
    ("s3://AKIAKEY:s3cr3t@bucket/dvc", "s3://bucket/dvc"),
    ("https://user:pw-SECRET@git.example/lineage.git", "https://git.example/lineage.git"),
    ("https://tok-SECRET@git.example/x", "https://git.example/x"),
    ("https://host/x?token=tok-SECRET&region=eu", "https://host/x?region=eu"),
    ("user:pw-SECRET@host:repo.git", "host:repo.git"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("/srv/lineage.git", "/srv/lineage.git"),
])
def test_urls_are_recorded_without_credentials(url: str, stripped: str) -> None:
    from tasks.registry import strip_credentials

    assert strip_credentials(url) == stripped


def _git_objects_text(repo: Path) -> str:
    """Every object in a repository (blobs, trees, commits), decompressed."""
    out = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo, capture_output=True,
                         check=True)
    return out.stdout.decode(errors="replace")


def _workspace(tmp_path: Path, params: Params) -> Any:
    from tasks.params import JobCfg, JobParent
    from tasks.workspace import Workspace

    job = JobCfg(id="0123456789abcdef", family="tiny", inputs="inputs", parents={"p": JobParent(domain="math")},
                 suites=["zoo:math"])

    def populate(inputs: Path) -> None:
        (inputs / "p").mkdir(parents=True)
        (inputs / "p" / "weights.bin").write_bytes(b"weights")

    return Workspace.create(params.root / "workspaces" / job.id, params, job, {"family": "tiny"}, populate)


def test_a_committed_workspace_holds_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets in containers.env/task_env: none of them in the workspace's params.yaml, in its commits, or in the
    lineage repository it pushed to (every git object searched); the stripped URLs are what dvc.json records."""
    root = tmp_path / "root"
    monkeypatch.setenv("SARMERGE_PIPELINE_ROOT", str(root))
    params = make_params("docker", {**DOCKER, "env": {"AWS_SECRET_ACCESS_KEY": AWS_KEY, "MLFLOW_TRACKING_TOKEN": TOKEN,
                                                      "SARMERGE_THREADS": "2"},
                                    "task_env": {"evaluate": {"HF_TOKEN": PASSWORD}}},
                         dvc={"remote": str(root / "dvc-remote"), "git_remote": str(root / "lineage.git")})
    # no stage has run in this workspace: an empty stage list lets the real `dvc commit` / `dvc push` / `git push`
    # of Workspace.commit() run through (the secrets at stake are in params.yaml, job.json and the DVC config)
    import tasks.workspace

    monkeypatch.setattr(tasks.workspace, "workspace_dvc_yaml", lambda: "stages: {}\n")
    ws = _workspace(tmp_path, params)
    info = ws.commit()
    committed = yaml.safe_load((ws.path / "params.yaml").read_text())
    assert committed["containers"]["env"]["SARMERGE_THREADS"] == "2"
    assert committed["containers"]["env"]["AWS_SECRET_ACCESS_KEY"].startswith("<redacted")
    for repo in (ws.path, root / "lineage.git"):
        text = _git_objects_text(repo)
        assert "SARMERGE_THREADS" in text  # the search does see the params
        for secret in (AWS_KEY, TOKEN, PASSWORD):
            assert secret not in text, f"{secret} found in {repo}'s git objects"
    assert info["repo"] == str(root / "lineage.git")


def test_credentials_of_a_dvc_remote_stay_in_untracked_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.workspace import LINEAGE_REMOTE

    root = tmp_path / "root"
    monkeypatch.setenv("SARMERGE_PIPELINE_ROOT", str(root))
    params = make_params("local", dvc={"remote": "s3://AKIAKEY:s3cr3t-SECRET@bucket/dvc",
                                       "git_remote": "https://user:pw-SECRET@git.example/lineage.git"})
    ws = _workspace(tmp_path, params)
    text = _git_objects_text(ws.path)
    assert "s3cr3t-SECRET" not in text and "pw-SECRET" not in text
    assert "s3://bucket/dvc" in (ws.path / ".dvc" / "config").read_text()
    assert ws._local_dvc_url() == "s3://AKIAKEY:s3cr3t-SECRET@bucket/dvc"  # DVC itself still authenticates
    tracked = subprocess.run(["git", "ls-files"], cwd=ws.path, capture_output=True, text=True, check=True).stdout
    assert ".dvc/config.local" not in tracked.split()
    url = subprocess.run(["git", "remote", "get-url", LINEAGE_REMOTE], cwd=ws.path, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert url == "https://user:pw-SECRET@git.example/lineage.git"
    committed = yaml.safe_load((ws.path / "params.yaml").read_text())
    assert committed["dvc"] == {"remote": "s3://bucket/dvc", "git_remote": "https://git.example/lineage.git"}


def test_sandbox_isolation_is_recorded_in_the_version_description_form() -> None:
    from tasks.evaluate import describe_sandbox, sandbox_record

    iso = {"mode": "rlimits", "isolated": False, "network_isolated": False, "filesystem_isolated": True,
           "memory_cap": "rlimit-per-process", "notes": [], "limits": {"nproc": 64}}
    record = sandbox_record({"sandbox": iso})
    assert record == {"mode": "rlimits", "isolated": False, "memory_cap": "rlimit-per-process",
                      "missing": ["network_isolated"]}
    assert "NOT isolated" in describe_sandbox(record) and "network_isolated" in describe_sandbox(record)
    assert sandbox_record({"sandbox": None}) is None and "no suite ran" in describe_sandbox(None)
    full = sandbox_record({"sandbox": {**iso, "mode": "bwrap", "isolated": True, "network_isolated": True}})
    assert "fully isolated" in describe_sandbox(full)
