"""Helpers for the pipeline tests: real servers on free loopback ports (started and stopped by PID), a small RLVR-like
family, and an Airflow home with a migrated database."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tasks.stack import free_port, stop_group

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# MLflow 3.17 fetches a telemetry config from outside unless told not to; the tests' clients, servers and every
# subprocess they start (environments are copied from os.environ) are offline
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status < 500:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class MlflowServer:
    def __init__(self, root: Path, *, webhooks_key: str | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow.log"
        env = {**os.environ,
               # a Fernet key: 32 url-safe base64-encoded bytes
               "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": webhooks_key or base64.urlsafe_b64encode(b"s" * 32).decode(),
               "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
               "MLFLOW_WEBHOOK_CACHE_TTL": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
        wait_http(f"{self.url}/health", 120, self.proc, self.log)

    def stop(self) -> None:
        stop_group(self.proc.pid, grace=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


# -- a small RLVR-like family: sparse bf16 updates of one tiny base ------------------------------------------------
CALIB = {
    "math": [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in [(3, 4), (12, 7), (25, 30), (8, 9), (40, 2),
                                                                          (61, 17), (5, 5), (33, 44)]],
    "code": [{"prompt": f"print('{w}'.upper())=", "response": w.upper()} for w in
             ["ab", "cat", "dog", "hi", "xyz", "moon", "sun", "tree"]],
}


def make_family(out: Path, specs: list[tuple[str, str, int]] | None = None, *, base_seed: int = 0,
                density: float = 0.1, scale: float = 0.05) -> dict[str, Path]:
    """base/ plus one checkpoint per (name, domain, seed) moving a random `density` of the base's weights, in bf16
    (like RLVR updates), and calib_<domain>.jsonl; deterministic for the seeds."""
    import torch

    from sarmerge.zoo.tiny import save_checkpoint, tiny_model

    specs = specs or [("math_s0", "math", 1), ("code_s0", "code", 2)]
    out.mkdir(parents=True, exist_ok=True)
    base, tok = tiny_model(seed=base_seed)
    base = base.to(torch.bfloat16)
    paths = {"base": save_checkpoint(base, tok, out / "base")}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, _domain, seed in specs:
        g = torch.Generator().manual_seed(seed)
        model, _ = tiny_model(seed=base_seed)
        model = model.to(torch.bfloat16)
        new = {}
        for k, v in state.items():
            mask = torch.rand(v.shape, generator=g) < density
            noise = torch.randn(v.shape, generator=g) * scale
            new[k] = (v.float() + mask * noise).to(v.dtype)
        model.load_state_dict(new)
        paths[name] = save_checkpoint(model, tok, out / name)
    for domain in {d for _, d, _ in specs}:
        f = out / f"calib_{domain}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in CALIB[domain]))
        paths[f"calib_{domain}"] = f
    return paths


def airflow_env(home: Path, dags: Path | None = None, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags or REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        **extra,
    }


def migrate_airflow(home: Path, template: Path | None = None) -> None:
    """A migrated Airflow DB in `home` (copied from `template` when given: migrating takes seconds)."""
    home.mkdir(parents=True, exist_ok=True)
    if template is not None and (template / "airflow.db").exists():
        shutil.copy(template / "airflow.db", home / "airflow.db")
        return
    subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=airflow_env(home), check=True,
                   capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def env_vars(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_params(path: Path, *, root: Path, family: str, methods: dict | None = None, **sections: dict) -> Path:
    """A params.yaml for a test: the repo's file with one family `<family>-(math|code)`, small Fisher/eval settings,
    fast retries, and `sections` deep-merged on top."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.pop("job", None)
    raw["pipeline"].update({"root": str(root), "retries": 1, "retry_delay_s": 1, "step_timeout_s": 900})
    raw["families"] = [{"name": family, "models": f"{family}-(math|code)", "merged_model": f"{family}-merged"}]
    raw["merge"]["methods"] = methods or {"sar": {}, "task_arithmetic": {"lambda": 1.0}}
    raw["fisher"].update({"examples": 4, "batch_size": 4, "max_new_tokens": 4})
    raw["evaluate"].update({"limit": 3, "batch_size": 8})
    for section, values in sections.items():
        if section == "families":
            raw["families"] = values
        elif isinstance(raw.get(section), dict) and isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def register(path: Path, name: str, *, domain: str | None = None, kind: str = "rlvr", base: str | None = None,
             calib: Path | None = None) -> dict:
    """Register through the Python API of `sarmerge register` (same code path, without a process start);
    returns what `sarmerge register --json` prints."""
    from tasks.register import register_checkpoint

    ref, created = register_checkpoint(path, name=name, domain=domain or "base", kind=kind, base=base, calib=calib)
    return {**ref.to_json(), "uri": ref.uri, "created": created}


_DAG_TEST = """
import json, sys, importlib.util
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dr = module.dag.test(run_conf=json.loads(sys.argv[2]))
from airflow import settings
from airflow.models.taskinstance import TaskInstance
from sqlalchemy import select
with settings.Session() as session:
    tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dr.dag_id,
                                                     TaskInstance.run_id == dr.run_id)).all()
    states = {f"{ti.task_id}[{ti.map_index}]": [str(ti.state), ti.try_number] for ti in tis}
print("DAGTEST " + json.dumps({"state": str(dr.state), "run_id": dr.run_id, "tis": states}))
"""


def dag_test(dag_file: Path, env: dict[str, str], run_conf: dict | None = None, timeout: float = 900) -> dict:
    """Run the real DAG file under `dag.test()` in a fresh interpreter; returns the run state and task states."""
    proc = subprocess.run([sys.executable, "-c", _DAG_TEST, str(dag_file), json.dumps(run_conf or {})],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DAGTEST ")]
    if not lines:
        raise RuntimeError(f"dag.test() of {dag_file} crashed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    result = json.loads(lines[-1][len("DAGTEST "):])
    result["log"] = proc.stdout + proc.stderr
    return result
