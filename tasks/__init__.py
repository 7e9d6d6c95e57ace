"""The pipeline (SPEC §2): its steps, the helpers they share, and the services around them.

Steps: one module per row of the step table `tasks/steps.py` (`python -m tasks.steps` prints it), each a command with
paths in and artifacts out that runs the same way from a shell (`python -m tasks.X ...`), a `dvc.yaml` stage, a local
Airflow task and a container: `plan` (and `plan finish`), `fisher`, `evaluate`, `merge`, `analyze`, `workspace
commit`, `register merged`, `promote`; plus `regression` (the regression_eval DAG's one step) and `register
checkpoint` (= `sarmerge register`, the user's upload).

Shared by the steps: `steps` (the table), `params` (params.yaml), `registry` (MLflow conventions), `ledger`
(exactly-once claims), `workspace` (per-job git + DVC folders), `cache`, `evidence` (gates' statistics on evaluation
records), `containers` (the runner settings schema), `common` (logging, the result line, exit codes),
`trainer_callback` (registration from a transformers/TRL run).

Services (long-running, not steps): `stack` (the embedded and production stacks), `relay` (the MLflow webhook relay),
`demo` (the README's first command).

Steps may import `sarmerge` (lazily, after cheap cache checks) and MLflow/DVC, never Airflow.
"""
