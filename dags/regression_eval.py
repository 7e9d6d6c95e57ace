"""regression_eval: on a schedule, re-evaluate the versions behind `@champion` (whatever a person last promoted in the
MLflow UI) and the other aliases in params.yaml `regression.aliases`, with the seeds and settings recorded at
registration. A drop beyond `regression.tolerance` tags the version (`sarmerge.regression=drop`), fails the task with
the scores in its message, and calls the alert hook (sarmerge_airflow/callbacks.py).
"""

from __future__ import annotations

from airflow.sdk import DAG

from sarmerge_airflow.callbacks import alert
from sarmerge_airflow.runner import Runner
from tasks.params import load_params

params = load_params()
runner = Runner(params)

with DAG(
    dag_id="regression_eval",
    description="re-evaluate @champion (and other aliases) with fixed seeds; alert on a drop",
    schedule=params.regression.schedule,
    catchup=False,
    max_active_runs=1,
    default_args={**runner.defaults(), "retries": 0, "on_failure_callback": alert},
    tags=["sarmerge"],
    doc_md=__doc__,
) as dag:
    for fam in params.families:
        runner.step(f"regression_{fam.name}", "tasks.regression", ["--family", fam.name])
