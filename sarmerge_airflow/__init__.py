"""Airflow-side helpers of the sarmerge pipeline, importable by every Airflow component (the triggerer included):
the registry-watching event trigger, the one runner switch every DAG task goes through, and the alert callback.

Nothing here imports torch, transformers or the sarmerge library, so DAG files that use it parse fast.
"""
