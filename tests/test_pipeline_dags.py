"""The real DAG files under `dag.test()` against a real MLflow server: merge_on_upload end to end (with tasks killed
mid-way and retried by Airflow), exactly-once on a repeated event, bit-for-bit DVC reproduction, and regression_eval
flagging an injected drop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
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
    # 6 problems per suite: the fewest on which losing every problem is a detectable drop (exact McNemar p = 0.03)
    params = write_params(tmp / "params.yaml", root=root, family="dt", pairing={"enhancement": False},
                          evaluate={"limit": 6})
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PARAMS": str(params),
              "SARMERGE_PIPELINE_ROOT": str(root)}
    env = airflow_env(home, **values)
    with env_vars(**values):
        fam = make_family(tmp / "fam", [("math_s0", "math", 41), ("code_s0", "code", 42)], base_seed=3)
        base = register(fam["base"], "dt-base", kind="base")
        math = register(fam["math_s0"], "dt-math", domain="math", base=base["uri"], calib=fam["calib_math"])
        code = register(fam["code_s0"], "dt-code", domain="code", base=base["uri"], calib=fam["calib_code"])
        yield {"env": env, "root": root, "tmp": tmp, "math": math, "code": code, "family": fam, "base": base}


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

    failures = [ln for ln in merged["log"].splitlines() if re.search(r"exited with status|: error: |Traceback", ln)]
    assert merged["state"] == "success", "\n".join(failures[-20:]) or merged["log"][-5000:]
    tries = merged["tis"]
    # each killed task died once (marker left) and succeeded on Airflow's retry
    assert sorted(p.name for p in (setup["tmp"] / "faults").iterdir()) == sorted(FAULTS.split(","))
    for task in ("plan[-1]", "commit[0]", "register[0]"):
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
        # 6 problems per suite cannot show non-inferiority within 3 points: every gate says so, with its interval
        assert v.tags[reg.TAG_GATE] == "inconclusive" and "underpowered: needs" in v.tags[reg.TAG_GATE_DETAIL]
        gate_tags = {k: t for k, t in v.tags.items() if k.startswith("sarmerge.gate.") and k != reg.TAG_GATE_DETAIL}
        assert set(gate_tags) == {f"sarmerge.gate.noninferior_dt-math-v{math['version']}",
                                  f"sarmerge.gate.noninferior_dt-code-v{code['version']}",
                                  "sarmerge.gate.vs_base_zoo_math", "sarmerge.gate.vs_base_zoo_code"}
        for t in gate_tags.values():
            assert re.fullmatch(r"inconclusive [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] margin 0\.030 n=6 "
                                r"needs \d+", t), t
        assert set(json.loads(v.tags[reg.TAG_SCORES])) == {"zoo:math", "zoo:code"}
        assert len(v.tags[reg.TAG_DVC_REV]) == 40 and v.tags[reg.TAG_PARAMS_HASH]
        mv = client.get_model_version("dt-merged", v.version)
        assert "| parent `models:/dt-code/" in mv.description and "Gates" in mv.description
        assert "❔ inconclusive" in mv.description and "Paired differences" in mv.description
        assert f"get-artifact?run_uuid={v.run_id}&path=evaluation/samples.jsonl" in mv.description
        card = Path(mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path="checkpoint/README.md",
                                                        dst_path=str(setup["tmp"] / "cards" / v.version)))
        front = yaml.safe_load(card.read_text().split("---\n")[1])
        assert front["base_model_relation"] == "merge" and front["library_name"] == "transformers"
        assert set(front["base_model"]) == {f"models:/dt-code/{code['version']}", f"models:/dt-math/{math['version']}",
                                            setup["base"]["uri"]}
        results = front["model-index"][0]["results"]
        assert {r["dataset"]["name"] for r in results} == {"zoo:math", "zoo:code"}
        assert all("95% CI" in r["metrics"][0]["name"] for r in results)
        run = client.get_run(v.run_id)
        assert {"eval.zoo_math", "eval.zoo_code", "base.zoo_math"} <= set(run.data.metrics)
        top = {f.path for f in client.list_artifacts(v.run_id)}
        assert {"checkpoint", "evaluation", "analysis", "evidence"} <= top
        assert "analysis/report.html" in {f.path for f in client.list_artifacts(v.run_id, "analysis")}
    assert reg.alias_ref(client, "dt-merged", "candidate") is None  # candidate only on pass of every gate
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


def _relog_samples(client, run_id: str, tmp: Path, edit) -> list[dict]:
    """Rewrite the evaluation recorded in a version's run (`evaluation/samples.jsonl`); returns the original."""
    got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation/samples.jsonl",
                                                   dst_path=str(tmp / "orig")))
    original = [json.loads(line) for line in got.read_text().splitlines()]
    out = tmp / "edited" / "samples.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(edit(dict(r))) + "\n" for r in original))
    client.log_artifact(run_id, str(out), "evaluation")
    return original


def test_regression_eval_flags_an_injected_drop(setup, merged, tmp_path):
    from tasks import registry as reg

    client = _client()
    sar = next(reg.ModelRef.from_version(mv) for mv in client.search_model_versions("name = 'dt-merged'")
               if mv.tags[reg.TAG_METHOD] == "sar")
    client.set_registered_model_alias("dt-merged", "champion", sar.version)  # a person promotes in the UI
    ok = dag_test(REPO / "dags" / "regression_eval.py", setup["env"])
    assert ok["state"] == "success", ok["log"][-3000:]
    tags = client.get_model_version("dt-merged", sar.version).tags
    # the same greedy model on the same 6 problems: no alarm, and no claim either (6 cannot rule out 5 points)
    assert tags[reg.TAG_REGRESSION] == "inconclusive", tags[reg.TAG_REGRESSION_DETAIL]
    assert "underpowered: needs" in tags[reg.TAG_REGRESSION_DETAIL]

    # inject a drop: the recorded evaluation now says every problem was solved; the live model solves none of at
    # least one suite (asserted), which on 6 paired problems is an interval wholly below -tolerance ([-1, -0.22])
    original = _relog_samples(client, sar.run_id, tmp_path, lambda r: {**r, "correct": True, "verdict": "correct"})
    assert any(not any(r["correct"] for r in original if r["suite"] == s) for s in ("zoo:math", "zoo:code")), \
        "precondition: the tiny merge solves no problem of some suite"
    try:
        bad = dag_test(REPO / "dags" / "regression_eval.py", setup["env"])
        assert bad["state"] == "failed"
        assert bad["tis"]["regression_dt[-1]"][0] == "failed"
        tags = client.get_model_version("dt-merged", sar.version).tags
        assert tags[reg.TAG_REGRESSION] == "drop" and "champion" in tags[reg.TAG_REGRESSION_DETAIL]
        assert "→ drop" in tags[reg.TAG_REGRESSION_DETAIL]
        alerts = [json.loads(line) for line in (setup["root"] / "alerts.jsonl").read_text().splitlines()]
        assert alerts[-1]["dag_id"] == "regression_eval" and "dropped" in alerts[-1]["error"]
        assert "REGRESSION" in bad["log"]
    finally:
        _relog_samples(client, sar.run_id, tmp_path / "restore", lambda r: original.pop(0))


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
