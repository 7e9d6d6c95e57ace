"""Pipeline steps (SPEC §2): one module per step, each a command with paths in and artifacts out.

Every step runs the same way from a shell (`python -m tasks.X ...`), from a `dvc.yaml` stage, from a local Airflow task
and inside a container. Steps may import `sarmerge` (lazily, after cheap cache checks) and MLflow/DVC, never Airflow.
"""
