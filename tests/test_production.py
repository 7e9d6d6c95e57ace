"""The production topology with real services (SPEC §8): `python -m tasks.stack up --profile production` brings up
PostgreSQL, Redis, an S3 server (moto), MLflow on PostgreSQL with S3 artifacts, and Airflow on CeleryExecutor with two
workers (`default`; `default,gpu` as the GPU host). One stack serves the whole module.

- a registered upload alone → merge_on_upload on the Celery workers → a merged version in MLflow whose artifacts lie
  in the S3 bucket (downloaded from S3, they reproduce the registered sha256); the Fisher step ran on the gpu worker;
- a fresh clone of the lineage repository + `dvc pull` from S3 reproduces the registered sha256;
- two uploads at once, and a Celery worker SIGKILLed (with every process under it) mid-step: the step is retried on
  the other worker; two jobs, each version processed exactly once, ending as undisturbed jobs (same artifacts, no
  duplicate versions, a clean DVC workspace), work spread over both workers;
- regression_eval runs on the same stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pipeline_support import VENV_BIN, env_vars, make_family, register, write_params

pytestmark = pytest.mark.pipeline
FAMILY = "prod"
# a TI whose worker stopped heart-beating is failed (and retried) after this; Airflow's default is 300 s
HEARTBEAT_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    for module in ("airflow.providers.celery", "psycopg2", "redis", "moto", "dvc_s3", "boto3"):
        pytest.importorskip(module, reason="the production extra: pip install -e '.[production]'")
    from tasks.stack import Stack, s3_client

    tmp = tmp_path_factory.mktemp("prod")
    root = tmp / "root"
    params = write_params(tmp / "params.yaml", root=root, family=FAMILY, pairing={"enhancement": False},
                          merge={"methods": {"sar": {}}}, trigger={"poll_interval_s": 2}, analyze={"geometry": False},
                          fisher={"examples": 2, "max_new_tokens": 2}, evaluate={"limit": 2})
    s = Stack(tmp / "stack")
    state = s.up(profile="production", params=params, parallelism=2,
                 extra_env={"SARMERGE_PIPELINE_ROOT": str(root),
                            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S)})
    env = s.env()
    try:
        with env_vars(MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"], SARMERGE_PARAMS=env["SARMERGE_PARAMS"],
                      SARMERGE_PIPELINE_ROOT=str(root)):
            from tasks.registry import get_client
            from tasks.relay import AirflowClient

            fam = make_family(tmp / "fam", [("math_s0", "math", 61), *((f"code_{i}", "code", 70 + i)
                                                                        for i in range(3))], base_seed=5)
            yield {"stack": s, "state": state, "tmp": tmp, "root": root, "family": fam, "client": get_client(),
                   "s3_env": s.s3_env(), "s3": s3_client(s.s3_env()),
                   "api": AirflowClient(env["AIRFLOW_API_URL"], user=env["AIRFLOW_API_USER"],
                                        password=env["AIRFLOW_API_PASSWORD"])}
    finally:
        s.down(grace=10)


def _merged_for(client, parent: str) -> list:
    from tasks.registry import ModelRef, search_versions

    return [v for v in (ModelRef.from_version(mv) for mv in search_versions(client, f"name = '{FAMILY}-merged'"))
            if parent in v.tags["sarmerge.parents"]]


def _task_instances(api, run_id: str = "~") -> list[dict]:
    return api.request("GET", f"/api/v2/dags/merge_on_upload/dagRuns/{run_id}/taskInstances?limit=500")[
        "task_instances"]


def _tries(api, ti: dict) -> list[dict]:
    path = (f"/api/v2/dags/merge_on_upload/dagRuns/{ti['dag_run_id']}/taskInstances/{ti['task_id']}/"
            f"{ti['map_index']}/tries")
    return sorted(api.request("GET", path)["task_instances"], key=lambda t: t["try_number"])


def _upload_code(stack, base: dict, i: int) -> dict:
    return register(stack["family"][f"code_{i}"], f"{FAMILY}-code", domain="code", base=base["uri"],
                    calib=stack["family"]["calib_code"] if i == 0 else None)


@pytest.fixture(scope="module")
def first_merge(stack):
    """Base and math uploaded (math alone has no partner), then one code upload — nothing else."""
    from tasks.demo import wait_processed

    fam = stack["family"]
    base = register(fam["base"], f"{FAMILY}-base", kind="base")
    math = register(fam["math_s0"], f"{FAMILY}-math", domain="math", base=base["uri"], calib=fam["calib_math"])
    wait_processed(stack["client"], [(f"{FAMILY}-math", math["version"])], 600, api=stack["api"])
    t0 = time.monotonic()
    code = _upload_code(stack, base, 0)
    states = wait_processed(stack["client"], [(f"{FAMILY}-code", code["version"])], 900, api=stack["api"])
    return {"base": base, "math": math, "code": code, "states": states, "job_s": time.monotonic() - t0}


def test_an_upload_alone_merges_on_celery_with_s3_artifacts_and_fisher_on_the_gpu_worker(stack, first_merge,
                                                                                          tmp_path):
    from tasks import registry as reg
    from tasks.demo import wait_runs_finished

    client, api, s3 = stack["client"], stack["api"], stack["s3"]
    code = first_merge["code"]
    assert first_merge["states"] == {f"{FAMILY}-code/{code['version']}": "done"}
    (v,) = _merged_for(client, f"models:/{FAMILY}-code/{code['version']}")
    assert v.tags[reg.TAG_METHOD] == "sar" and v.tags[reg.TAG_GATE] in ("pass", "fail", "inconclusive")
    assert set(json.loads(v.tags[reg.TAG_SCORES])) == {"zoo:math", "zoo:code"}
    assert {"evaluation", "analysis", "checkpoint", "evidence"} <= {f.path for f in client.list_artifacts(v.run_id)}
    runs = wait_runs_finished(api, 600)
    assert all(r["state"] == "success" for r in runs), [(r["dag_run_id"], r["state"]) for r in runs]

    # the artifacts are objects in the S3 bucket (MLflow proxies them), not files on a local disk ...
    from tasks.stack import MLFLOW_BUCKET

    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=MLFLOW_BUCKET)
            for o in page.get("Contents", [])]
    prefix = next((k.split("/checkpoint/")[0] + "/checkpoint/" for k in keys
                   if f"/{v.run_id}/artifacts/checkpoint/" in k), None)
    assert prefix, f"no checkpoint of run {v.run_id} in s3://{MLFLOW_BUCKET}: {keys[:20]}"
    assert not list((Path(stack["state"]["dir"]) / "mlflow").rglob("*.safetensors"))
    # ... and the bytes in S3 are the registered ones
    out = tmp_path / "from-s3"
    for key in (k for k in keys if k.startswith(prefix)):
        dest = out / key[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(MLFLOW_BUCKET, key, str(dest))
    assert reg.content_digest(out) == v.sha256

    # every task ran on a Celery worker; the Fisher step on the GPU host's queue and worker, nothing else there
    owner = client.get_model_version(f"{FAMILY}-code", code["version"]).tags[reg.TAG_CLAIMED_BY]
    tis = [t for t in _task_instances(api, owner) if t["state"] == "success"]
    fisher = [t for t in tis if t["task_id"] == "fisher"]
    assert fisher and all(t["queue"] == "gpu" and t["hostname"] == "worker-gpu" for t in fisher), fisher
    steps = [t for t in tis if t["operator"] == "LocalStepOperator" and t["task_id"] != "fisher"]
    assert steps and all(t["queue"] == "default" for t in steps)
    assert {t["hostname"] for t in tis} <= {"worker-default", "worker-gpu"}
    print(json.dumps({"first_job_s": round(first_merge["job_s"], 1),
                      "hosts": sorted({(t["task_id"], t["hostname"]) for t in tis})}))


def test_a_fresh_clone_and_dvc_pull_from_s3_reproduce_the_registered_sha256(stack, first_merge, tmp_path):
    from tasks import registry as reg

    (v,) = _merged_for(stack["client"], f"models:/{FAMILY}-code/{first_merge['code']['version']}")
    assert v.tags[reg.TAG_DVC_REMOTE].startswith("s3://")
    clone = tmp_path / "clone"
    env = {**os.environ, **stack["s3_env"], "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=clone if clone.exists() else tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
        return proc.stdout

    sh("git", "clone", "-q", v.tags[reg.TAG_DVC_REPO], str(clone))
    sh("git", "checkout", "-q", v.tags[reg.TAG_DVC_REV])
    sh("dvc", "config", "--local", "cache.dir", str(tmp_path / "fresh-cache"))  # nothing shared with the pipeline
    sh("dvc", "pull", "-q")
    assert "up to date" in sh("dvc", "status")
    assert reg.content_digest(clone / "out" / "merged" / "sar") == v.sha256


def test_two_uploads_at_once_survive_a_worker_killed_mid_step(stack, first_merge):
    """Two uploads at once → two jobs on the two workers; a worker SIGKILLed (with every process under it) during a
    CPU step → the step is retried on the other worker; each version ends processed exactly once, as undisturbed.
    (One scenario for both: each merge job costs minutes on 2 cores.)"""
    from tasks import registry as reg
    from tasks.demo import wait_processed, wait_runs_finished
    from tasks.stack import WORKERS

    client, api, s = stack["client"], stack["api"], stack["stack"]
    results: dict[int, dict] = {}

    def upload(i: int) -> None:
        results[i] = _upload_code(stack, first_merge["base"], i)

    threads = [threading.Thread(target=upload, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [(f"{FAMILY}-code", r["version"]) for r in results.values()]
    assert len(set(keys)) == 2

    def task_instances() -> list[dict]:
        owners = {client.get_model_version(*k).tags.get(reg.TAG_CLAIMED_BY) for k in keys} - {None}
        return [t for o in sorted(owners) for t in _task_instances(api, o)]

    # a CPU step running after every Fisher is done (so the GPU worker is not needed while one worker is down)
    victim, deadline = None, time.monotonic() + 900
    while victim is None and time.monotonic() < deadline:
        tis = task_instances()
        fishers = [t for t in tis if t["task_id"] == "fisher"]
        running = [t for t in tis if t["state"] == "running" and t["task_id"] in ("merge", "evaluate", "analyze")
                   and t["hostname"] in WORKERS]
        if fishers and all(t["state"] == "success" for t in fishers) and running:
            victim = running[0]
        else:
            time.sleep(0.5)
    assert victim is not None, "no CPU step was seen running"
    killed = s.kill(victim["hostname"])
    assert killed
    other = next(w for w in WORKERS if w != victim["hostname"])
    try:
        deadline = time.monotonic() + 600  # heartbeat timeout, then the retry on the other worker
        while time.monotonic() < deadline and not any(t["try_number"] >= 2 and t["state"] in ("running", "success")
                                                      for t in _tries(api, victim)):
            time.sleep(2)
    finally:
        s.restart(victim["hostname"])  # the host comes back; the retry already runs elsewhere
    states = wait_processed(client, keys, 1200, api=api)
    assert set(states.values()) == {"done"}, states
    runs = wait_runs_finished(api, 600)
    assert all(r["state"] == "success" for r in runs), [(r["dag_run_id"], r["state"]) for r in runs]

    tries = _tries(api, victim)
    assert len(tries) >= 2 and tries[0]["hostname"] == victim["hostname"], tries
    assert tries[-1]["hostname"] == other and tries[-1]["state"] == "success", tries
    # each version processed once (one merged version, one job each), ending as an undisturbed job
    merged = [_merged_for(client, f"models:/{n}/{v}") for n, v in keys]
    assert [len(m) for m in merged] == [1, 1]
    assert len({m[0].tags[reg.TAG_JOB] for m in merged}) == 2
    (first,) = _merged_for(client, f"models:/{FAMILY}-code/{first_merge['code']['version']}")
    expected = {f.path for f in client.list_artifacts(first.run_id)}
    for (v,) in merged:
        assert set(json.loads(v.tags[reg.TAG_SCORES])) == {"zoo:math", "zoo:code"} and v.tags[reg.TAG_GATE]
        assert {f.path for f in client.list_artifacts(v.run_id)} == expected
        workspace = stack["root"] / "jobs" / v.tags[reg.TAG_JOB]
        if workspace.exists():  # no stray DVC outputs: the job's workspace is exactly its commit
            status = subprocess.run(["git", "status", "--porcelain"], cwd=workspace, capture_output=True, text=True,
                                    timeout=60)
            assert status.returncode == 0 and status.stdout.strip() == "", status.stdout
    hosts = {t["hostname"] for t in task_instances() if t["hostname"]}
    assert hosts == set(WORKERS), hosts
    _wait_workers(s)
    print(json.dumps({"killed": victim["hostname"], "step": victim["task_id"], "pids": len(killed),
                      "tries": [(t["try_number"], t["hostname"], t["state"]) for t in tries]}))


def _wait_workers(s) -> None:
    deadline = time.monotonic() + 180
    env = {"AIRFLOW__CELERY__BROKER_URL": s.secrets()["CELERY_BROKER_URL"]}
    while not s._workers_ready(env):
        assert time.monotonic() < deadline, "restarted Celery worker did not come back"
        time.sleep(2)


def test_regression_eval_runs_on_the_same_stack(stack, first_merge):
    from tasks import registry as reg

    client, api = stack["client"], stack["api"]
    (v,) = _merged_for(client, f"models:/{FAMILY}-code/{first_merge['code']['version']}")
    client.set_registered_model_alias(f"{FAMILY}-merged", "champion", v.version)  # a person promotes in the UI
    run = api.request("POST", "/api/v2/dags/regression_eval/dagRuns", {"logical_date": None})
    deadline = time.monotonic() + 600
    while True:
        state = api.request("GET", f"/api/v2/dags/regression_eval/dagRuns/{run['dag_run_id']}")["state"]
        if state in ("success", "failed") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert state == "success"
    # 2 examples per suite: too few for a conclusive verdict either way, but no drop
    assert client.get_model_version(f"{FAMILY}-merged", v.version).tags[reg.TAG_REGRESSION] in ("ok", "inconclusive")
    tis = api.request("GET", f"/api/v2/dags/regression_eval/dagRuns/{run['dag_run_id']}/taskInstances")
    assert {t["hostname"] for t in tis["task_instances"]} <= {"worker-default", "worker-gpu"}


# -- without the stack -------------------------------------------------------------------------------------------
def test_gpu_steps_are_routed_by_the_queue_in_params(tmp_path):
    """The DAG file as parsed: Fisher goes to params.yaml `pipeline.gpu_queue` and the gpu pool, every other step to
    Airflow's default queue."""
    pytest.importorskip("airflow")
    import runpy

    params = write_params(tmp_path / "params.yaml", root=tmp_path / "root", family="rq",
                          pipeline={"gpu_queue": "h200"})
    with env_vars(SARMERGE_PARAMS=str(params), SARMERGE_PIPELINE_ROOT=str(tmp_path / "root")):
        dag = runpy.run_path(str(Path(__file__).resolve().parent.parent / "dags" / "merge_on_upload.py"))["dag"]
    fisher = dag.get_task("fisher")
    assert (fisher.queue, fisher.pool) == ("h200", "gpu")
    others = [t for t in dag.tasks if t.task_id != "fisher"]
    assert others and {t.queue for t in others} == {"default"}


def test_gpu_queue_must_be_a_plain_name(tmp_path):
    from sarmerge.errors import SarmergeError
    from tasks.params import load_params

    params = write_params(tmp_path / "params.yaml", root=tmp_path / "root", family="rq",
                          pipeline={"gpu_queue": "gpu,default"})
    with pytest.raises(SarmergeError, match="gpu_queue"):
        load_params(params)


def test_an_unknown_profile_fails_before_starting_anything(tmp_path):
    from tasks.stack import main

    with pytest.raises(SystemExit) as e:
        main(["up", "--dir", str(tmp_path / "s"), "--profile", "staging"])
    assert e.value.code == 2
    assert not (tmp_path / "s").exists()
