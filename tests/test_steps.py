"""The pipeline graph is declared once, in tasks/steps.py: the DAG's tasks and edges, plan's argument lists and
dvc.yaml's job stages all follow the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.steps import BY_NAME, STEPS, dvc_stages, step_args, write_dvc

REPO = Path(__file__).resolve().parent.parent


def test_dvc_yaml_job_stages_are_the_rendered_table(tmp_path: Path) -> None:
    committed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rendered = dvc_stages()
    assert set(rendered) == {s.name for s in STEPS if s.dvc is not None}
    for name, stage in rendered.items():
        assert committed.get(name) == stage, (f"dvc.yaml stage {name!r} differs from tasks/steps.py; run "
                                              "`python -m tasks.steps --write-dvc`")
    # rewriting is a fixpoint on the committed file (formatting, comments and other stages kept) ...
    copy = tmp_path / "dvc.yaml"
    copy.write_text((REPO / "dvc.yaml").read_text())
    write_dvc(copy)
    assert copy.read_text() == (REPO / "dvc.yaml").read_text()
    # ... and repairs a stage edited by hand without touching the others
    broken = yaml.safe_load(copy.read_text())
    broken["stages"]["merge"]["do"]["cmd"] = "python -m tasks.merge --workspace ."
    copy.write_text(yaml.safe_dump(broken, sort_keys=False))
    write_dvc(copy)
    fixed = yaml.safe_load(copy.read_text())["stages"]
    assert fixed["merge"] == rendered["merge"] and fixed["experiment"] == committed["experiment"]


def test_plan_hands_every_mapped_step_its_argument_lists() -> None:
    jobs = [{"workspace": "/w/j1", "parents": ["math_s0", "code_s0"]}, {"workspace": "/w/j2", "parents": ["m1", "m2"]}]
    args = step_args(jobs, ["sar", "ties"])
    assert set(args) == {s.name for s in STEPS if s.mapped}
    assert args["fisher"][:2] == [["--workspace", "/w/j1", "--parent", "math_s0"],
                                  ["--workspace", "/w/j1", "--parent", "code_s0"]]
    assert len(args["fisher"]) == 4 and len(args["merge"]) == 4 and len(args["evaluate_inputs"]) == 6
    assert ["--workspace", "/w/j2", "--model", "merged/ties"] in args["evaluate"]
    assert ["--workspace", "/w/j1", "--model", "inputs/base"] in args["evaluate_inputs"]
    assert args["promote"] == args["commit"] == [["--workspace", "/w/j1"], ["--workspace", "/w/j2"]]
    assert step_args([], ["sar"]) == {name: [] for name in args}


def test_the_table_is_a_graph_whose_names_are_the_modules_steps() -> None:
    for step in STEPS:
        assert all(u in BY_NAME and STEPS.index(BY_NAME[u]) < STEPS.index(step) for u in step.after), step.name
        assert (REPO / (step.module.replace(".", "/") + ".py")).is_file(), step.module


def test_the_dag_has_one_task_per_step_named_and_wired_as_the_table(tmp_path: Path) -> None:
    probe = ("import json, runpy, sys\n"
             "dag = runpy.run_path(sys.argv[1])['dag']\n"
             "print(json.dumps({t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}))")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "SARMERGE_PIPELINE_ROOT": str(tmp_path / "r")}
    proc = subprocess.run([sys.executable, "-c", probe, str(REPO / "dags" / "merge_on_upload.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    graph = json.loads(proc.stdout.strip().splitlines()[-1])
    helpers = {"collect_events", "done", *(f"{s.name}_args" for s in STEPS if s.mapped)}
    assert set(graph) == {s.name for s in STEPS} | helpers
    for step in STEPS:
        upstream = set(graph[step.name]) - helpers
        assert upstream == set(step.after), f"{step.name}: DAG upstream {upstream} != table {set(step.after)}"
        if step.mapped:
            assert f"{step.name}_args" in graph[step.name]
    assert set(graph["done"]) == {"promote", "finish"}
