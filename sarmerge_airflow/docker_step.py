"""DockerOperator running one pipeline step (`pipeline.runner: docker`); built by sarmerge_airflow/containers.py.

Behaves like the local runner's LocalStepOperator: the step's SARMERGE_RESULT line becomes the XCom; a
failure names the step, its exit status and last output line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from docker.errors import DockerException
from docker.types import DeviceRequest

from sarmerge_airflow.containers import STEP_ENTRYPOINT, forwarded_env, last_line, parse_result

PODMAN_UNMASK = "unmask=ALL"  # podman's form of `--security-opt systempaths=unconfined`


def _is_podman(cli: Any) -> bool:
    """The engine behind the Docker API is podman (`podman system service`)."""
    try:
        components = cli.version().get("Components") or []
    except (DockerException, OSError):  # requests' connection errors are OSErrors
        return False
    return any("podman" in str(c.get("Name", "")).lower() for c in components)


class StepDockerOperator(DockerOperator):
    template_fields: Sequence[str] = (*DockerOperator.template_fields, "args", "suffix")
    ui_color = "#e3effa"

    def __init__(self, *, module: str, args: Sequence[Any] = (), prefix: Sequence[str] = (),
                 suffix: Sequence[Any] = (), pass_env: Sequence[str] = (),
                 run_as: str = "worker", pull: str = "missing", gpus: int = 0, gpu_step: bool = False,
                 security_opt: Sequence[str] = (), unmask_proc: bool = False, **kwargs: Any) -> None:
        if gpus:
            # `docker run --gpus N`: the NVIDIA container toolkit on the Docker host maps N GPUs in
            kwargs["device_requests"] = [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
        kwargs.setdefault("xcom_all", True)  # every log line: the result line need not be the last one
        super().__init__(**kwargs)
        self.module, self.args, self.prefix, self.suffix = module, list(args), list(prefix), list(suffix)
        self.pass_env, self.run_as, self.pull = list(pass_env), run_as, pull
        self.gpus, self.gpu_step, self.security_opt, self.unmask_proc = gpus, gpu_step, list(security_opt), unmask_proc

    def step_command(self) -> list[str]:
        return [STEP_ENTRYPOINT, self.module, *map(str, self.prefix), *map(str, self.args), *map(str, self.suffix)]

    # -- checks at task start, each naming the setting to fix --------------------------------------------------------
    def _check_engine(self) -> None:
        url = self.docker_url if isinstance(self.docker_url, str) else self.docker_url[0]
        if url.startswith("unix://"):
            sock = Path("/" + url.removeprefix("unix://").lstrip("/"))
            if not sock.is_socket():
                raise AirflowFailException(
                    f"containers.docker.url (or $DOCKER_HOST) = {url}: no Docker API socket at {sock}. Start the "
                    f"engine (on this machine: `bash scripts/containers.sh start`) or point the setting at one")
        try:
            self.cli.ping()  # the hook raises AirflowException when no host answers
        except (DockerException, AirflowException) as e:
            raise AirflowFailException(f"containers.docker.url (or $DOCKER_HOST) = {url}: the Docker API does not "
                                       f"answer: {e}") from e

    def _ensure_image(self) -> None:
        setting = "containers.gpu_image (or $SARMERGE_GPU_IMAGE)" if self.gpu_step else \
            "containers.cpu_image (or $SARMERGE_CPU_IMAGE)"
        present = bool(self.cli.images(name=self.image))
        if present and self.pull != "always":
            return
        if self.pull == "never":
            raise AirflowFailException(
                f"{setting} = {self.image!r}: no such image on the Docker host and containers.docker.pull is "
                f"'never'. Build it (docker build -f docker/Dockerfile.cpu|cuda -t {self.image} ., or here `bash "
                f"scripts/containers.sh build`)")
        self.log.info("pulling %s", self.image)
        try:
            for _ in self.cli.pull(self.image, stream=True, decode=True):
                pass
        except DockerException as e:
            raise AirflowFailException(f"{setting} = {self.image!r}: cannot pull it ({e}); build it or push it to a "
                                       f"registry the Docker host reaches") from e
        if not self.cli.images(name=self.image):
            raise AirflowFailException(f"{setting} = {self.image!r}: the pull did not produce the image")

    def _add_security_opt(self) -> None:
        """DockerOperator has no security_opt argument: add the sandbox's needs (tasks/containers.py) to the host
        config it builds."""
        if not self.security_opt and not self.unmask_proc:
            return
        cli = self.cli
        build_host_config = getattr(cli, "_sarmerge_create_host_config", cli.create_host_config)
        security_opt = list(self.security_opt)
        if self.unmask_proc and _is_podman(cli):
            # podman's Docker API ignores empty MaskedPaths/ReadonlyPaths (checked on podman 4.3) but takes its own
            # security option, which Docker's daemon would refuse: add it only on podman
            security_opt.append(PODMAN_UNMASK)

        def with_sandbox_settings(*args: Any, **kwargs: Any) -> Any:
            host_config = build_host_config(*args, **{**kwargs, "security_opt": security_opt or None})
            if self.unmask_proc:  # what `docker run --security-opt systempaths=unconfined` sends
                host_config["MaskedPaths"], host_config["ReadonlyPaths"] = [], []
            return host_config

        cli._sarmerge_create_host_config = build_host_config  # a second execute() wraps the original, not a wrapper
        cli.create_host_config = with_sandbox_settings

    # -- run ---------------------------------------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        self.command = self.step_command()
        self.user = {"worker": f"{os.getuid()}:{os.getgid()}", "image": None}.get(self.run_as, self.run_as)
        # credentials and endpoints of the worker, read now (never stored in the serialized DAG)
        self._private_environment = {**forwarded_env(self.pass_env), **self._private_environment}
        self._check_engine()
        self._normalize_mounts()
        if str(self.docker_url).startswith("unix://"):  # a local engine: bind sources must exist
            for m in self.mounts:
                source = m.get("Source")
                if source and not Path(source).exists():
                    Path(source).mkdir(parents=True, exist_ok=True)
        self._ensure_image()
        self._add_security_opt()
        self.log.info("running %s in %s", " ".join(self.command), self.image)
        try:
            lines = self._run_image() or []
        except DockerContainerFailedException as e:
            raise AirflowException(f"{self.module} failed in a container of {self.image} ({e}): "
                                   f"{last_line(e.logs or [])}") from e
        if isinstance(lines, str):
            lines = [lines]
        result = parse_result(lines)
        return result
