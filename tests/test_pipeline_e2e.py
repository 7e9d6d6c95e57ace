"""End to end with `airflow standalone` (LocalExecutor), a real MLflow server and the webhook relay: registering a
checkpoint alone yields a registered, evaluated merge; a burst of five uploads is processed exactly once each with
no DVC lock error; a task SIGKILLed mid-way is retried by Airflow to the same final state; both trigger paths fire."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from pipeline_support import env_vars, make_family, register, write_params

pytestmark = pytest.mark.pipeline
BURST = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("airflow")
    from tasks.stack import Stack

    tmp = tmp_path_factory.mktemp("e2e")
    root = tmp / "root"
    families = [{"name": "e2e", "models": "e2e-(math|code)", "merged_model": "e2e-merged"},
                {"name": "e2p", "models": "e2p-(math|code)", "merged_model": "e2p-merged", "watcher": False}]
    params = write_params(tmp / "params.yaml", root=root, family="e2e", families=families,
                          pairing={"enhancement": False}, merge={"methods": {"sar": {}}},
                          trigger={"poll_interval_s": 2}, analyze={"geometry": False},
                          fisher={"examples": 2, "max_new_tokens": 2}, evaluate={"limit": 2})
    s = Stack(tmp / "stack")
    state = s.up(params=params, parallelism=2,
                 extra_env={"SARMERGE_PIPELINE_ROOT": str(root), "SARMERGE_FAULT": "register.after_version",
                            "SARMERGE_FAULT_ONCE": str(tmp / "faults")})
    env = s.env()
    try:
        with env_vars(MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"], SARMERGE_PARAMS=str(params),
                      SARMERGE_PIPELINE_ROOT=str(root)):
            from tasks.registry import get_client
            from tasks.relay import AirflowClient

            fam = make_family(tmp / "fam", [("math_s0", "math", 61), *((f"code_{i}", "code", 70 + i)
                                                                        for i in range(BURST + 1))], base_seed=5)
            yield {"state": state, "tmp": tmp, "root": root, "family": fam, "client": get_client(),
                   "api": AirflowClient(env["AIRFLOW_API_URL"], user=env["AIRFLOW_API_USER"],
                                        password=env["AIRFLOW_API_PASSWORD"]),
                   "airflow_home": Path(state["airflow_home"])}
    finally:
        s.down(grace=10)


@pytest.fixture(scope="module")
def first_merge(stack):
    """Base and math uploaded (math alone has no partner), then one code upload — nothing else."""
    from tasks.demo import wait_processed

    fam = stack["family"]
    base = register(fam["base"], "e2e-base", kind="base")
    math = register(fam["math_s0"], "e2e-math", domain="math", base=base["uri"], calib=fam["calib_math"])
    wait_processed(stack["client"], [("e2e-math", math["version"])], 600, api=stack["api"])
    code = register(fam["code_0"], "e2e-code", domain="code", base=base["uri"], calib=fam["calib_code"])
    states = wait_processed(stack["client"], [("e2e-code", code["version"])], 900, api=stack["api"])
    return {"base": base, "math": math, "code": code, "states": states}


def _merged(client) -> list:
    from tasks.registry import ModelRef, search_versions

    return [ModelRef.from_version(mv) for mv in search_versions(client, "name = 'e2e-merged'")]


def _task_tries(api, run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
    tis = api.request("GET", f"/api/v2/dags/merge_on_upload/dagRuns/{run_id}/taskInstances?limit=200")
    return {(t["task_id"], t["map_index"]): (t["state"], t["try_number"]) for t in tis["task_instances"]}


def test_registering_a_checkpoint_alone_yields_a_registered_evaluated_merge(stack, first_merge):
    from tasks import registry as reg
    from tasks.demo import wait_runs_finished

    client, api = stack["client"], stack["api"]
    code, math = first_merge["code"], first_merge["math"]
    assert first_merge["states"] == {f"e2e-code/{code['version']}": "done"}
    assert client.get_model_version("e2e-math", math["version"]).tags[reg.TAG_STATE] in ("skipped", "done")
    merged = [v for v in _merged(client) if f"models:/e2e-code/{code['version']}" in v.tags[reg.TAG_PARENTS]]
    assert len(merged) == 1
    (v,) = merged
    assert v.tags[reg.TAG_METHOD] == "sar" and v.tags[reg.TAG_GATE] in ("pass", "fail", "inconclusive")
    assert set(json.loads(v.tags[reg.TAG_SCORES])) == {"zoo:math", "zoo:code"}
    assert {"evaluation", "analysis", "checkpoint", "evidence"} <= {f.path for f in client.list_artifacts(v.run_id)}
    runs = wait_runs_finished(api, 600)
    assert all(r["state"] == "success" for r in runs), [(r["dag_run_id"], r["state"]) for r in runs]
    # the register task was SIGKILLed after creating the version, and Airflow's retry finished the job
    owner = client.get_model_version("e2e-code", code["version"]).tags[reg.TAG_CLAIMED_BY]
    assert _task_tries(api, owner)[("register", 0)] == ("success", 2)
    assert (stack["tmp"] / "faults" / "register.after_version").exists()


def test_a_burst_of_uploads_is_processed_exactly_once_without_dvc_lock_errors(stack, first_merge):
    from tasks import registry as reg
    from tasks.demo import wait_processed, wait_runs_finished

    client, fam, base = stack["client"], stack["family"], first_merge["base"]
    results: dict[int, dict] = {}

    def upload(i: int) -> None:
        results[i] = register(fam[f"code_{i}"], "e2e-code", domain="code", base=base["uri"])

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(1, BURST + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [("e2e-code", r["version"]) for r in results.values()]
    assert len(set(keys)) == BURST
    states = wait_processed(client, keys, 1500, api=stack["api"])
    assert set(states.values()) == {"done"}, states
    runs = wait_runs_finished(stack["api"], 900)
    assert all(r["state"] == "success" for r in runs), [(r["dag_run_id"], r["state"]) for r in runs]

    merged = _merged(client)
    for name, version in keys:
        mine = [v for v in merged if f"models:/{name}/{version}" in v.tags[reg.TAG_PARENTS]]
        assert len(mine) == 1, (version, [m.uri for m in mine])  # processed once, never twice
    assert len({v.tags[reg.TAG_MERGE_KEY] for v in merged}) == len(merged) == BURST + 1
    # every event, from both trigger paths, ended in a run; versions were claimed by exactly one of them
    named = {(e["name"], e["version"]) for r in runs for e in r["events"]}
    assert set(keys) <= named
    logs = "\n".join(p.read_text(errors="replace") for p in (stack["airflow_home"] / "logs").rglob("*.log"))
    assert not re.search(r"Unable to acquire lock|LockError|is busy, it is being blocked by", logs)
    assert "dvc push" not in logs or "failed with exit" not in logs


def test_both_trigger_paths_start_runs(stack, first_merge):
    """The watcher (pull) and the relay (push, the only path of family e2p) both start merge_on_upload."""
    from tasks.demo import trigger_latencies, wait_processed, wait_runs_finished

    client = stack["client"]
    # new content (the same bytes would be "already registered"); no partner in family e2p: planned, then skipped
    extra = make_family(stack["tmp"] / "push", [("code_p", "code", 91)], base_seed=5)
    ref = register(extra["code_p"], "e2p-code", domain="code", base=first_merge["base"]["uri"])
    wait_processed(client, [("e2p-code", ref["version"])], 600, api=stack["api"])
    runs = wait_runs_finished(stack["api"], 600)
    rows = trigger_latencies(client, runs)
    paths = {(r["version"].split("/")[0], r["path"]) for r in rows}
    assert ("e2p-code", "webhook") in paths and ("e2p-code", "watcher") not in paths
    assert ("e2e-math", "watcher") in paths or ("e2e-code", "watcher") in paths
    out = stack["tmp"] / "latencies.json"
    out.write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows))
