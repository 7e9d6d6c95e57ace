"""merge_on_upload: a new RLVR model version in the MLflow registry → Fisher → merges → evaluation → analysis →
versioned (DVC) → registered → gated → aliased: the steps of tasks/steps.py. No human in the loop; a person promotes
in the MLflow UI.

Scheduled on one Asset per model family (params.yaml `families`), fed by an AssetWatcher polling the registry and by
the webhook relay (tasks/relay.py). Events may coalesce into one run: `plan` claims every version they name (and any
unprocessed one) in the ledger, exactly once. Every task runs a `tasks/` step through the runner switch.
Manual run: trigger with conf {"versions": [{"name": "tiny-code", "version": "1"}]}.
"""

from __future__ import annotations

import json
import os

from airflow.sdk import DAG, Asset, AssetAny, AssetWatcher, task

from sarmerge_airflow.callbacks import alert
from sarmerge_airflow.runner import Runner
from sarmerge_airflow.triggers import MlflowRegistryTrigger
from tasks.params import load_params
from tasks.steps import STEPS

params = load_params()
runner = Runner(params)
tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")

family_assets = [
    Asset(
        name=fam.asset_name,
        uri=fam.asset_uri,
        watchers=[AssetWatcher(name=f"{fam.asset_name}_registry",
                               trigger=MlflowRegistryTrigger(tracking_uri=tracking_uri, models=fam.models,
                                                             poll_interval=params.trigger.poll_interval_s,
                                                             family=fam.name))]
        if params.watched(fam) else [],
    )
    for fam in params.families
]

with DAG(
    dag_id="merge_on_upload",
    description="merge each new RLVR checkpoint with its partners, evaluate, register, gate",
    schedule=AssetAny(*family_assets),  # any family's new version (a plain list would wait for all of them)
    catchup=False,
    max_active_runs=4,
    default_args={**runner.defaults(), "on_failure_callback": alert},
    tags=["sarmerge"],
    doc_md=__doc__,
) as dag:

    @task(retries=0)
    def collect_events(**context: object) -> str:
        """The versions named by the triggering asset events (watcher or webhook) and by a manual run's conf."""
        found: list[dict[str, str]] = []
        for events in (context.get("triggering_asset_events") or {}).values():
            for ev in events:
                extra = dict(ev.extra or {})
                payload = extra.get("payload", extra) if extra.get("from_trigger") else extra
                if isinstance(payload, dict) and "name" in payload and "version" in payload:
                    found.append({"name": str(payload["name"]), "version": str(payload["version"])})
        conf = getattr(context.get("dag_run"), "conf", None) or {}
        for v in conf.get("versions", []):
            if isinstance(v, str) and "/" in v:
                name, version = v.rsplit("/", 1)
                v = {"name": name, "version": version}
            found.append({"name": str(v["name"]), "version": str(v["version"])})
        print(f"{len(found)} event(s): {found}")
        return json.dumps(found)

    @task(retries=0)
    def pick(result: dict, key: str) -> list:
        """One argument list per mapped task instance (Airflow maps over return values only)."""
        return result["args"][key]

    # one task per row of the step table (tasks/steps.py), its name as task id, wired by its `after`
    ops = {}
    for step in STEPS:
        if step.name == "plan":
            args = ["--events", collect_events()]
        elif step.mapped:
            args = pick.override(task_id=f"{step.name}_args")(ops["plan"].output, step.name)
        else:
            args = []
        ops[step.name] = runner.task(step, args)
        for upstream in step.after:
            ops[upstream] >> ops[step.name]

    @task(trigger_rule="none_failed", retries=0)
    def done() -> None:
        """... and the run fails visibly whenever any step failed (a run with nothing to merge succeeds)."""

    [ops["promote"], ops["finish"]] >> done()
