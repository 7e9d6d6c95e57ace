"""The embedded stack: MLflow (sqlite + local artifacts), Airflow standalone (LocalExecutor, low parallelism) and the
webhook relay, all on loopback ports, started and stopped by PID.

    python -m tasks.stack up --dir runs/demo        # prints the URLs; state in runs/demo/stack.json
    python -m tasks.stack status --dir runs/demo
    python -m tasks.stack down --dir runs/demo      # SIGTERM each process group, SIGKILL after a grace period

Each service runs in its own process group (its PID is the group id), so `down` stops it and every child
(Airflow's scheduler, workers, triggerer, …) without touching anything else on the machine. Secrets (the Airflow
password, the webhook secret) are generated per stack into files readable only by the owner.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from tasks.params import REPO_ROOT, params_path

BIN = Path(sys.executable).parent
STATE = "stack.json"
# Concurrent Airflow tasks: 2-4 on a small machine (each step is a Python process that imports torch)
DEFAULT_PARALLELISM = min(4, max(2, os.cpu_count() or 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(pgid: int, grace: float = 30.0) -> None:
    """Stop a process group we started: SIGTERM, wait, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status == 200


def _wait(what: str, check: Any, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise SarmergeError(f"{what}: the process exited with {proc.returncode} while starting; log tail:\n{tail}")
        try:
            value = check()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.5)
    raise SarmergeError(f"{what}: not ready after {timeout:.0f}s ({last}); see {log}")


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class Stack:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).resolve()
        self.state_file = self.dir / STATE

    def state(self) -> dict[str, Any]:
        if not self.state_file.exists():
            raise SarmergeError(f"{self.state_file}: no stack here (start one with `python -m tasks.stack up`)")
        return json.loads(self.state_file.read_text())

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, Path]:
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        return proc, log

    def up(self, *, params: str | Path | None = None, parallelism: int = DEFAULT_PARALLELISM, relay: bool = True,
           relay_models: str | None = None, extra_env: dict[str, str] | None = None,
           timeout: float = 300) -> dict[str, Any]:
        if self.state_file.exists() and any(_group_alive(p) for p in self.state().get("pids", {}).values()):
            raise SarmergeError(f"{self.dir}: a stack is already running here (stop it with `python -m tasks.stack "
                                f"down --dir {self.dir}`)")
        if not 2 <= parallelism <= 16:
            raise SarmergeError(f"--parallelism {parallelism}: use 2-4 on a small machine (at most 16)")
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        ports = {"mlflow": free_port(), "airflow": free_port(), "relay": free_port()}
        urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
        state: dict[str, Any] = {"dir": str(self.dir), "ports": ports, "urls": urls, "pids": {},
                                 "parallelism": parallelism}
        password, webhook_secret = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        _write_secret(self.dir / "airflow" / "passwords.json", json.dumps({"sarmerge": password}))
        _write_secret(self.dir / "secrets.env", f"AIRFLOW_API_USER=sarmerge\nAIRFLOW_API_PASSWORD={password}\n"
                                                f"SARMERGE_WEBHOOK_SECRET={webhook_secret}\n")
        params_file = str(Path(params).resolve()) if params else str(params_path())
        base_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
                    "SARMERGE_PARAMS": params_file, "MLFLOW_TRACKING_URI": urls["mlflow"], **(extra_env or {})}
        try:
            # -- MLflow: sqlite backend, local artifacts served by the server, webhooks allowed to loopback
            mlflow_env = {**base_env,
                          "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": _fernet_key(self.dir / "mlflow" / "webhook.key"),
                          "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                          "MLFLOW_WEBHOOK_CACHE_TTL": "2",
                          # MLflow's GenAI job runner (~10 huey consumer processes, ~240 MB each) is unused here
                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            (self.dir / "mlflow").mkdir(exist_ok=True)
            proc, log = self._spawn("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                               f"sqlite:///{self.dir / 'mlflow' / 'mlflow.db'}",
                                               "--artifacts-destination", str(self.dir / "mlflow" / "artifacts"),
                                               "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1"],
                                    mlflow_env, self.dir / "mlflow")
            state["pids"]["mlflow"] = proc.pid
            self._save(state)
            mlflow_proc, mlflow_log = proc, log

            # -- Airflow standalone: LocalExecutor, low parallelism, our DAGs unpaused, one known user
            home = self.dir / "airflow"
            af_env = {**base_env,
                      "AIRFLOW_HOME": str(home),
                      "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
                      "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                      "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                      "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                      "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                      "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "sarmerge:admin",
                      "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
                      "AIRFLOW__API__HOST": "127.0.0.1",
                      "AIRFLOW__API__PORT": str(ports["airflow"]),
                      "AIRFLOW__API__BASE_URL": urls["airflow"],
                      "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
                      # SQLite: writers wait for the lock instead of failing (sarmerge_airflow/sqlite.py)
                      "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "sarmerge_airflow.sqlite.CONNECT_ARGS",
                      "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "sarmerge_airflow.sqlite.ASYNC_CONNECT_ARGS",
                      "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}
            migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=af_env, capture_output=True,
                                     text=True, timeout=600)
            if migrate.returncode != 0:
                raise SarmergeError(f"airflow db migrate failed: {migrate.stderr[-2000:]}")
            pool = subprocess.run([str(BIN / "airflow"), "pools", "set", "gpu", "1", "GPU steps (one per GPU)"],
                                  env=af_env, capture_output=True, text=True, timeout=300)
            if pool.returncode != 0:
                raise SarmergeError(f"airflow pools set gpu failed: {pool.stderr[-2000:]}")
            proc, log = self._spawn("airflow", [str(BIN / "airflow"), "standalone"], af_env, home)
            state["pids"]["airflow"] = proc.pid
            state["airflow_home"] = str(home)
            self._save(state)

            _wait("MLflow", lambda: _ok(f"{urls['mlflow']}/health"), timeout, mlflow_proc, mlflow_log)

            from tasks.relay import AirflowClient

            def airflow_ready() -> bool:
                health = _get(f"{urls['airflow']}/api/v2/monitor/health")
                return all(health.get(k, {}).get("status") == "healthy"
                           for k in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

            _wait("Airflow", airflow_ready, timeout, proc, log)
            api = AirflowClient(urls["airflow"], user="sarmerge", password=password)
            _wait("Airflow DAG merge_on_upload", lambda: api.request("GET", "/api/v2/dags/merge_on_upload"), timeout,
                  proc, log)

            # -- the relay (push path) and the MLflow webhook pointing at it
            if relay:
                relay_env = {**base_env, "AIRFLOW_API_URL": urls["airflow"], "AIRFLOW_API_USER": "sarmerge",
                             "AIRFLOW_API_PASSWORD": password, "SARMERGE_WEBHOOK_SECRET": webhook_secret}
                if relay_models:
                    relay_env["SARMERGE_RELAY_MODELS"] = relay_models
                proc, log = self._spawn("relay", [sys.executable, "-m", "tasks.relay", "serve", "--port",
                                                  str(ports["relay"])], relay_env, REPO_ROOT)
                state["pids"]["relay"] = proc.pid
                self._save(state)
                _wait("relay", lambda: _get(f"{urls['relay']}/health"), 60, proc, log)
                hook = subprocess.run([sys.executable, "-m", "tasks.relay", "install-webhook", "--url",
                                       f"{urls['relay']}/webhook"], env=relay_env, capture_output=True, text=True,
                                      cwd=REPO_ROOT, timeout=120)
                if hook.returncode != 0:
                    raise SarmergeError(f"installing the MLflow webhook failed: {hook.stderr[-2000:]}")
                state["webhook_id"] = hook.stdout.strip().splitlines()[-1]
            state["started_in_s"] = round(time.monotonic() - t0, 1)
            self._save(state)
            return state
        except BaseException:
            self.down(grace=10)
            raise

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def down(self, grace: float = 30.0) -> list[str]:
        if not self.state_file.exists():
            return []
        state = json.loads(self.state_file.read_text())
        stopped = []
        for name in ("relay", "airflow", "mlflow"):
            pid = state.get("pids", {}).get(name)
            if pid and _group_alive(pid):
                stop_group(pid, grace)
                stopped.append(f"{name} (pid {pid})")
        state["pids"] = {}
        self._save(state)
        return stopped

    def env(self) -> dict[str, str]:
        """Environment for clients of this stack: tracking URI, params, Airflow credentials."""
        state = self.state()
        values = dict(line.split("=", 1) for line in (self.dir / "secrets.env").read_text().splitlines() if line)
        return {"MLFLOW_TRACKING_URI": state["urls"]["mlflow"], "AIRFLOW_API_URL": state["urls"]["airflow"],
                "AIRFLOW_API_USER": values["AIRFLOW_API_USER"], "AIRFLOW_API_PASSWORD": values["AIRFLOW_API_PASSWORD"]}


def _fernet_key(path: Path) -> str:
    """MLflow encrypts webhook secrets at rest with this key (32 url-safe base64 bytes), kept with the stack."""
    import base64

    if not path.exists():
        _write_secret(path, base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    return path.read_text().strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start MLflow, Airflow standalone and the relay")
    up.add_argument("--dir", required=True, type=Path)
    up.add_argument("--params", default=None, help="params.yaml for the pipeline (default: the repo's)")
    up.add_argument("--parallelism", type=int, default=DEFAULT_PARALLELISM,
                    help=f"Airflow core.parallelism (default {DEFAULT_PARALLELISM}: 2-4 by CPU count)")
    up.add_argument("--no-relay", action="store_true", help="watcher only, no webhook push path")
    for name in ("down", "status"):
        s = sub.add_parser(name)
        s.add_argument("--dir", required=True, type=Path)
    args = p.parse_args(argv)
    stack = Stack(args.dir)
    try:
        if args.command == "up":
            state = stack.up(params=args.params, parallelism=args.parallelism, relay=not args.no_relay)
            print(json.dumps({"urls": state["urls"], "pids": state["pids"], "started_in_s": state["started_in_s"]}))
        elif args.command == "down":
            stopped = stack.down()
            print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
        else:
            state = stack.state()
            alive = {k: _group_alive(v) for k, v in state.get("pids", {}).items()}
            print(json.dumps({"urls": state["urls"], "alive": alive}))
        return 0
    except SarmergeError as e:
        print(f"tasks.stack: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
