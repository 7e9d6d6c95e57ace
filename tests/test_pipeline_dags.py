"""The real DAG files under `dag.test()` against a real MLflow server: merge_on_upload end to end (with tasks killed
mid-way and retried by Airflow), exactly-once on a repeated event, bit-for-bit DVC reproduction, and regression_eval
flagging an injected drop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_support import (
    REPO,
    VENV_BIN,
    airflow_env,
    dag_test,
    env_vars,
    make_family,
    migrate_airflow,
    register,
    write_params,
)

pytestmark = pytest.mark.pipeline
FAULTS = "plan.after_claim,commit.after_dvc_commit,register.after_version"


@pytest.fixture(scope="module")
def setup(mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dags")
    home = tmp / "airflow"
    migrate_airflow(home)
    root = tmp / "root"
    params = write_params(tmp / "params.yaml", root=root, family="dt", pairing={"enhancement": False})
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PARAMS": str(params),
              "SARMERGE_PIPELINE_ROOT": str(root)}
    env = airflow_env(home, **values)
    with env_vars(**values):
        fam = make_family(tmp / "fam", [("math_s0", "math", 41), ("code_s0", "code", 42)], base_seed=3)
        base = register(fam["base"], "dt-base", kind="base")
        math = register(fam["math_s0"], "dt-math", domain="math", base=base["uri"], calib=fam["calib_math"])
        code = register(fam["code_s0"], "dt-code", domain="code", base=base["uri"], calib=fam["calib_code"])
        yield {"env": env, "root": root, "tmp": tmp, "math": math, "code": code, "family": fam}


@pytest.fixture(scope="module")
def merged(setup):
    """One merge_on_upload run for the new code version, with three tasks SIGKILLed once mid-way."""
    env = {**setup["env"], "SARMERGE_FAULT": FAULTS, "SARMERGE_FAULT_ONCE": str(setup["tmp"] / "faults")}
    code = setup["code"]
    return dag_test(REPO / "dags" / "merge_on_upload.py", env, {"versions": [f"dt-code/{code['version']}"]})


def _client():
    from tasks.registry import get_client

    return get_client()


def test_dag_files_parse_without_heavy_imports(setup):
    probe = ("import sys, runpy\n"
             "for f in sys.argv[1:]: runpy.run_path(f)\n"
             "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'sarmerge.merge', 'sarmerge.checkpoint')"
             " if m in sys.modules))")
    files = [str(REPO / "dags" / "merge_on_upload.py"), str(REPO / "dags" / "regression_eval.py")]
    proc = subprocess.run([sys.executable, "-c", probe, *files], capture_output=True, text=True, env=setup["env"],
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_runner_is_a_parse_error_naming_the_setting(setup):
    env = {**setup["env"], "SARMERGE_RUNNER": "nomad"}
    dag_file = REPO / "dags" / "regression_eval.py"
    proc = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({str(dag_file)!r})"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "pipeline.runner" in proc.stderr and "nomad" in proc.stderr


def test_merge_on_upload_end_to_end_with_killed_tasks_retried(setup, merged):
    from tasks import registry as reg

    assert merged["state"] == "success", merged["log"][-5000:]
    tries = merged["tis"]
    # each killed task died once (marker left) and succeeded on Airflow's retry
    assert sorted(p.name for p in (setup["tmp"] / "faults").iterdir()) == sorted(FAULTS.split(","))
    for task in ("plan[-1]", "version[0]", "register[0]"):
        assert tries[task] == ["success", 2], (task, tries[task])
    assert tries["merge[0]"][0] == tries["merge[1]"][0] == "success"

    client = _client()
    versions = [reg.ModelRef.from_version(mv) for mv in client.search_model_versions("name = 'dt-merged'")]
    assert sorted(v.tags[reg.TAG_METHOD] for v in versions) == ["sar", "task_arithmetic"]  # no duplicate
    code, math = setup["code"], setup["math"]
    for v in versions:
        assert v.kind == "merged" and v.domain == "code+math"
        assert set(v.tags[reg.TAG_PARENTS].split(",")) == {f"models:/dt-code/{code['version']}",
                                                           f"models:/dt-math/{math['version']}"}
        assert v.tags[reg.TAG_GATE] in ("pass", "fail") and v.tags[reg.TAG_GATE_DETAIL]
        assert set(json.loads(v.tags[reg.TAG_SCORES])) == {"zoo:math", "zoo:code"}
        assert len(v.tags[reg.TAG_DVC_REV]) == 40 and v.tags[reg.TAG_PARAMS_HASH]
        mv = client.get_model_version("dt-merged", v.version)
        assert "| parent `models:/dt-code/" in mv.description and "Gates" in mv.description
        run = client.get_run(v.run_id)
        assert {"eval.zoo_math", "eval.zoo_code", "base.zoo_math"} <= set(run.data.metrics)
        top = {f.path for f in client.list_artifacts(v.run_id)}
        assert {"checkpoint", "evaluation", "analysis", "evidence"} <= top
        assert "analysis/report.html" in {f.path for f in client.list_artifacts(v.run_id, "analysis")}
    if any(v.tags[reg.TAG_GATE] == "pass" for v in versions):
        assert reg.alias_ref(client, "dt-merged", "candidate") is not None
    for name, version in (("dt-code", code["version"]), ("dt-math", math["version"])):
        assert client.get_model_version(name, version).tags[reg.TAG_STATE] == "done"


def test_a_repeated_event_merges_nothing_twice(setup, merged):
    again = dag_test(REPO / "dags" / "merge_on_upload.py", setup["env"],
                     {"versions": [f"dt-code/{setup['code']['version']}"]})
    assert again["state"] == "success", again["log"][-3000:]
    assert again["tis"]["merge[-1]"][0] == "skipped"  # nothing planned
    assert len(_client().search_model_versions("name = 'dt-merged'")) == 2


def test_dvc_lineage_reproduces_the_merged_weights_bit_for_bit(setup, merged, tmp_path):
    from tasks import registry as reg

    sar = next(reg.ModelRef.from_version(mv) for mv in _client().search_model_versions("name = 'dt-merged'")
               if mv.tags[reg.TAG_METHOD] == "sar")
    repo, rev = sar.tags[reg.TAG_DVC_REPO], sar.tags[reg.TAG_DVC_REV]
    clone = tmp_path / "clone"
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=clone if clone.exists() else tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
        return proc.stdout

    sh("git", "clone", "-q", repo, str(clone))
    sh("git", "checkout", "-q", rev)
    sh("dvc", "config", "--local", "cache.dir", str(tmp_path / "fresh-cache"))  # nothing shared with the pipeline
    sh("dvc", "pull", "-q")
    assert "up to date" in sh("dvc", "status")
    assert reg.content_digest(clone / "out" / "merged" / "sar") == sar.sha256
    sh("dvc", "repro", "-f", "-s", "merge@sar")  # recompute the merge itself from the pulled inputs and Fisher
    assert reg.content_digest(clone / "out" / "merged" / "sar") == sar.sha256


def test_regression_eval_flags_an_injected_drop(setup, merged):
    from tasks import registry as reg

    client = _client()
    sar = next(reg.ModelRef.from_version(mv) for mv in client.search_model_versions("name = 'dt-merged'")
               if mv.tags[reg.TAG_METHOD] == "sar")
    client.set_registered_model_alias("dt-merged", "champion", sar.version)  # a person promotes in the UI
    ok = dag_test(REPO / "dags" / "regression_eval.py", setup["env"])
    assert ok["state"] == "success", ok["log"][-3000:]
    assert client.get_model_version("dt-merged", sar.version).tags[reg.TAG_REGRESSION] == "ok"

    recorded = json.loads(sar.tags[reg.TAG_SCORES])
    inflated = {s: min(1.0, v + 0.5) for s, v in recorded.items()}  # the live model now scores 0.5 below this
    client.set_model_version_tag("dt-merged", sar.version, reg.TAG_SCORES, json.dumps(inflated))
    bad = dag_test(REPO / "dags" / "regression_eval.py", setup["env"])
    assert bad["state"] == "failed"
    assert bad["tis"]["regression_dt[-1]"][0] == "failed"
    tags = client.get_model_version("dt-merged", sar.version).tags
    assert tags[reg.TAG_REGRESSION] == "drop" and "champion" in tags[reg.TAG_REGRESSION_DETAIL]
    alerts = [json.loads(line) for line in (setup["root"] / "alerts.jsonl").read_text().splitlines()]
    assert alerts[-1]["dag_id"] == "regression_eval" and "dropped" in alerts[-1]["error"]
    assert "REGRESSION" in bad["log"]
    client.set_model_version_tag("dt-merged", sar.version, reg.TAG_SCORES, json.dumps(recorded))


def test_params_errors_are_clear(tmp_path):
    from sarmerge.errors import SarmergeError
    from tasks.params import load_params

    bad = write_params(tmp_path / "p.yaml", root=tmp_path, family="x", merge={"primary": "nope"})
    with pytest.raises(SarmergeError, match=r"merge\.primary 'nope'"):
        load_params(bad)
    bad = write_params(tmp_path / "q.yaml", root=tmp_path, family="x", gate={"min_retention": -1})
    with pytest.raises(SarmergeError, match=r"gate\.min_retention"):
        load_params(bad)
    assert Path(load_params(REPO / "params.yaml").job.inputs) == Path("runs/tiny-family")
