"""The one runner switch every DAG task goes through (SPEC §8 Containers): a step is `python -m <module> <args>`, and
the runner decides where that command runs.

- `local` (implemented): a subprocess of the Airflow worker, in its own process group (killed with the task).
- `docker` / `kubernetes`: DockerOperator / KubernetesPodOperator running the same command in the project's image
  (sarmerge_airflow/containers.py; images, socket and cluster settings from params.yaml `containers:`).

The runner is chosen by `SARMERGE_RUNNER` or params.yaml `pipeline.runner`; an unknown name fails at DAG parse time,
naming the setting. Every step prints its result as the last stdout line (`SARMERGE_RESULT {...}`, tasks/common.py);
the operator returns it as the task's XCom. `Runner.task` builds the task of one row of the step table
(tasks/steps.py).

Paths passed to steps are absolute paths under the pipeline root; container runners must mount that root at the same
path.

GPU steps (`gpu=True`) go to the Celery queue params.yaml `pipeline.gpu_queue` (default `gpu`) as well as to the
pool their DAG names: under CeleryExecutor only workers started with `-q default,<gpu_queue>` (GPU hosts) take them;
LocalExecutor ignores queues.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from sarmerge.layout import RESULT_PREFIX
from tasks.params import REPO_ROOT, Params
from tasks.steps import Step

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the step's child, before exec: SIGKILL when the task process dies. The step runs in its own session (so
    on_kill can stop its whole group), which would otherwise let it outlive a worker killed with SIGKILL and keep
    writing after Airflow retried the task elsewhere."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class LocalStepOperator(BaseOperator):
    """Run `python -m <module> <prefix> <args> <suffix>` as a subprocess; its RESULT line becomes the XCom."""

    template_fields: Sequence[str] = ("args", "suffix")
    ui_color = "#e8f4ea"

    def __init__(self, *, module: str, args: Sequence[Any] = (), prefix: Sequence[str] = (),
                 suffix: Sequence[Any] = (), python: str | None = None,
                 env: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.module, self.args, self.prefix, self.suffix = module, list(args), list(prefix), list(suffix)
        self.python, self.env = python, env or {}
        self._proc: subprocess.Popen[str] | None = None

    def command(self) -> list[str]:
        return [self.python or sys.executable, "-m", self.module, *self.prefix, *map(str, self.args),
                *map(str, self.suffix)]

    def execute(self, context: Any) -> Any:
        cmd = self.command()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **self.env}
        self.log.info("running %s", " ".join(cmd))
        tail: deque[str] = deque(maxlen=40)
        result: Any = None
        self._proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                continue
            tail.append(line)
            self.log.info("%s", line)
        rc = self._proc.wait()
        self._proc = None
        if rc != 0:
            last = next((ln for ln in reversed(tail) if ln.strip()), "")
            raise AirflowException(f"{self.module} exited with status {rc}: {last}")
        return result

    def on_kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def _local(params: Params, *, task_id: str, module: str, gpu: bool, mapped_args: Any = None,
           **kwargs: Any) -> BaseOperator:
    python = params.pipeline.python or None
    if mapped_args is not None:
        return LocalStepOperator.partial(task_id=task_id, module=module, python=python, **kwargs).expand(
            args=mapped_args)
    return LocalStepOperator(task_id=task_id, module=module, python=python, **kwargs)


def _container(kind: str) -> Callable[..., BaseOperator]:
    def build(params: Params, **kwargs: Any) -> BaseOperator:
        from sarmerge_airflow.containers import build  # providers are imported only by DAGs that use them

        return build(kind, params, **kwargs)

    return build


_BUILDERS: dict[str, Callable[..., BaseOperator]] = {"local": _local, "docker": _container("docker"),
                                                     "kubernetes": _container("kubernetes")}


class Runner:
    """Builds the operator of each step for the configured runner."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.name = params.runner
        if self.name not in _BUILDERS:
            raise ValueError(f"pipeline.runner (or $SARMERGE_RUNNER) = {self.name!r}: unknown runner; available: "
                             f"{', '.join(sorted(_BUILDERS))}")
        self._build = _BUILDERS[self.name]

    def defaults(self) -> dict[str, Any]:
        p = self.params.pipeline
        return {"retries": p.retries, "retry_delay": timedelta(seconds=p.retry_delay_s),
                "execution_timeout": timedelta(seconds=p.step_timeout_s)}

    def _route(self, gpu: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
        """GPU steps to the GPU queue (a DAG may still name another queue explicitly)."""
        return {"queue": self.params.pipeline.gpu_queue, **kwargs} if gpu else kwargs

    def step(self, task_id: str, module: str, args: Sequence[Any] = (), *, gpu: bool = False,
             **kwargs: Any) -> BaseOperator:
        """One task running `python -m module *args` (args may hold Jinja templates and XComArgs)."""
        kwargs = self._route(gpu, kwargs)
        return self._build(self.params, task_id=task_id, module=module, gpu=gpu, args=list(args), **kwargs)

    def task(self, step: Step, args: Any = (), **kwargs: Any) -> Any:
        """The task of one step-table row: a plain task (`args` a list) or, for a mapped step, one instance per
        argument list (`args` an XComArg of lists)."""
        kwargs = {"prefix": list(step.command), "suffix": list(step.suffix), **kwargs}
        if step.trigger_rule:
            kwargs["trigger_rule"] = step.trigger_rule
        if step.gpu:
            kwargs.setdefault("pool", "gpu")
        if step.mapped:
            return self.mapped(step.name, step.module, args, gpu=step.gpu, **kwargs)
        return self.step(step.name, step.module, args, gpu=step.gpu, **kwargs)

    def mapped(self, task_id: str, module: str, args_list: Any, *, gpu: bool = False, **kwargs: Any) -> Any:
        """One mapped task instance per argument list in `args_list` (an XComArg of lists)."""
        kwargs = self._route(gpu, kwargs)
        return self._build(self.params, task_id=task_id, module=module, gpu=gpu, mapped_args=args_list, **kwargs)
