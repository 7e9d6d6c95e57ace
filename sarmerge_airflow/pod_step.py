"""KubernetesPodOperator running one pipeline step (`pipeline.runner: kubernetes`); built by
sarmerge_airflow/containers.py.

The pod runs `sarmerge-step <module> <args>`, which also writes the step's result to /airflow/xcom/return.json, where
the operator's XCom sidecar reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from sarmerge_airflow.containers import forwarded_env, split_secret_env


class StepPodOperator(KubernetesPodOperator):
    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "args", "suffix")
    ui_color = "#eae3fa"

    def __init__(self, *, module: str, args: Sequence[Any] = (), prefix: Sequence[str] = (),
                 suffix: Sequence[Any] = (), pass_env: Sequence[str] = (),
                 host_users: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.module, self.args, self.prefix, self.suffix = module, list(args), list(prefix), list(suffix)
        self.pass_env, self.host_users = list(pass_env), host_users

    def step_arguments(self) -> list[str]:
        return [self.module, *map(str, self.prefix), *map(str, self.args), *map(str, self.suffix)]

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        self.arguments = self.step_arguments()
        if not dry_run:  # the worker's MLflow endpoint and the like, read at task start
            present = {e.name for e in self.env_vars or [] if isinstance(e, k8s.V1EnvVar)}
            # never a credential as a plain value (those come from the Secret: sarmerge_airflow/containers.py)
            plain, _ = split_secret_env(forwarded_env(self.pass_env))
            self.env_vars = [*(self.env_vars or []),
                             *(k8s.V1EnvVar(name=k, value=v) for k, v in plain.items() if k not in present)]
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        if self.host_users is not None:
            pod.spec.host_users = self.host_users
        return pod

