"""The pipeline's stack on loopback ports, started and stopped by PID, in one of two profiles:

- `embedded` (default, the README's demo): MLflow (sqlite + local artifacts), Airflow standalone (LocalExecutor, low
  parallelism) and the webhook relay.
- `production` (SPEC §8 production topology): PostgreSQL (Airflow metadata DB and MLflow backend), Redis (Celery
  broker), an S3 server (moto), MLflow on PostgreSQL with proxied S3 artifacts, Airflow api-server, scheduler,
  dag-processor and triggerer on CeleryExecutor, two Celery workers (queue `default`, and `default,<gpu_queue>` as the
  GPU host), the relay, and the DVC remote on S3. docs/DEPLOY.md maps every setting to a real deployment.

    python -m tasks.stack up --dir runs/demo [--profile production]   # prints the URLs; state in runs/demo/stack.json
    python -m tasks.stack status --dir runs/demo
    python -m tasks.stack down --dir runs/demo      # SIGTERM each process group, SIGKILL after a grace period

Both profiles share one code path: the same MLflow server command (backend and artifact store differ), the same Airflow
settings (executor, database and broker differ; SQLite connect arguments only for SQLite), the same readiness checks
and relay. Each service runs in its own process group (its PID is the group id), so `down` stops it and every child
without touching anything else on the machine. Secrets (passwords, keys) are generated per stack into files readable
only by the owner; S3 credentials go to the MLflow server and the Airflow workers only (clients upload artifacts
through the MLflow server).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError, run_cli
from tasks.params import REPO_ROOT, load_params, params_path

BIN = Path(sys.executable).parent
STATE = "stack.json"
# Concurrent Airflow tasks: 2-4 on a small machine (each step is a Python process that imports torch)
DEFAULT_PARALLELISM = min(4, max(2, os.cpu_count() or 2))
PROFILES = ("embedded", "production")
# The production profile's buckets: MLflow artifacts, DVC remote
MLFLOW_BUCKET, DVC_BUCKET = "sarmerge-mlflow", "sarmerge-dvc"
# Celery workers of the production profile: name -> queues ("{gpu}" = params.yaml pipeline.gpu_queue)
WORKERS = {"worker-default": "default", "worker-gpu": "default,{gpu}"}
# Stop order: clients of a service before the service (processes of one tier are stopped together)
STOP_TIERS = (("relay", "airflow", "api-server", "scheduler", "dag-processor", "triggerer", *WORKERS), ("mlflow",),
              ("s3", "redis"), ("postgres",))
STOP_TIERS_FLAT = {name for tier in STOP_TIERS for name in tier}


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
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pgid, os.WNOHANG)  # reap our own exited leader: a zombie still counts as a group member
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


def _pg_bin() -> Path:
    """Debian's PostgreSQL server binaries (`postgresql` package), newest version first; $SARMERGE_PG_BIN overrides."""
    explicit = os.environ.get("SARMERGE_PG_BIN")
    found = [Path(explicit)] if explicit else sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                                                     key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                                                     reverse=True)
    for d in found:
        if (d / "postgres").exists() and (d / "initdb").exists():
            return d
    raise SarmergeError("PostgreSQL server binaries not found (Debian: apt-get install postgresql; or set "
                        "SARMERGE_PG_BIN to the directory holding initdb and postgres)")


def _need(binary: str, hint: str) -> str:
    path = shutil.which(binary) or (str(BIN / binary) if (BIN / binary).exists() else None)
    if not path:
        raise SarmergeError(f"{binary}: not found ({hint})")
    return path


def _reachable_by(path: Path, uid: int) -> bool:
    """Can user `uid` traverse every directory above `path`? (pytest's temp dirs are 0700 root)"""
    for d in [path, *path.parents]:
        st = d.stat()
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            return False
    return True


class Stack:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).resolve()
        self.state_file = self.dir / STATE
        self._specs: dict[str, tuple[list[str], dict[str, str], Path]] = {}  # for restart(): this process only

    def state(self) -> dict[str, Any]:
        if not self.state_file.exists():
            raise SarmergeError(f"{self.state_file}: no stack here (start one with `python -m tasks.stack up`)")
        return json.loads(self.state_file.read_text())

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path,
               user: str | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        as_user: dict[str, Any] = {"user": user, "group": user, "extra_groups": []} if user else {}
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                                    **as_user)
        self._specs[name] = (cmd, env, cwd)
        return proc, log

    def _start(self, state: dict[str, Any], name: str, cmd: list[str], env: dict[str, str], cwd: Path,
               user: str | None = None) -> tuple[subprocess.Popen, Path]:
        proc, log = self._spawn(name, cmd, env, cwd, user)
        state["pids"][name] = proc.pid
        self._save(state)
        return proc, log

    def up(self, *, profile: str = "embedded", params: str | Path | None = None,
           parallelism: int = DEFAULT_PARALLELISM, relay: bool = True, relay_models: str | None = None,
           extra_env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
        if profile not in PROFILES:
            raise SarmergeError(f"--profile {profile!r}: unknown profile; available: {', '.join(PROFILES)}")
        if self.state_file.exists() and any(_group_alive(p) for p in self.state().get("pids", {}).values()):
            raise SarmergeError(f"{self.dir}: a stack is already running here (stop it with `python -m tasks.stack "
                                f"down --dir {self.dir}`)")
        if not 2 <= parallelism <= 16:
            raise SarmergeError(f"--parallelism {parallelism}: use 2-4 on a small machine (at most 16)")
        production = profile == "production"
        # per readiness wait; MLflow's and Airflow's schema migrations on PostgreSQL take minutes on a loaded box
        timeout = timeout or (600 if production else 300)
        if production:  # fail before starting anything when a service binary is missing
            _pg_bin()
            _need("redis-server", "Debian: apt-get install redis-server")
            _need("moto_server", "pip install -e '.[production]'")
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        names = ["mlflow", "airflow", "relay"]
        if production:
            names += ["postgres", "redis", "s3", "trigger_log", *(f"{w}_log" for w in WORKERS)]
        ports = {k: free_port() for k in names}
        urls = {k: f"http://127.0.0.1:{ports[k]}" for k in ("mlflow", "airflow", "relay")}
        state: dict[str, Any] = {"dir": str(self.dir), "profile": profile, "ports": ports, "urls": urls, "pids": {},
                                 "parallelism": parallelism}
        password, webhook_secret = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        _write_secret(self.dir / "airflow" / "passwords.json", json.dumps({"sarmerge": password}))
        secret_lines = {"AIRFLOW_API_USER": "sarmerge", "AIRFLOW_API_PASSWORD": password,
                        "SARMERGE_WEBHOOK_SECRET": webhook_secret}
        params_file = Path(params).resolve() if params else params_path()
        base_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
                    "MLFLOW_TRACKING_URI": urls["mlflow"], "MLFLOW_DISABLE_TELEMETRY": "true", **(extra_env or {})}
        try:
            s3_env: dict[str, str] = {}
            if production:
                db_urls, broker = self._start_databases(state, secret_lines)
                s3_env = self._start_s3(state, secret_lines)
                params_file = self._params_with_s3_remote(params_file)
                mlflow_backend, mlflow_artifacts = db_urls["mlflow"], f"s3://{MLFLOW_BUCKET}/artifacts"
            else:
                mlflow_backend = f"sqlite:///{self.dir / 'mlflow' / 'mlflow.db'}"
                mlflow_artifacts = str(self.dir / "mlflow" / "artifacts")
            base_env["SARMERGE_PARAMS"] = str(params_file)
            state["params"] = str(params_file)
            _write_secret(self.dir / "secrets.env", "".join(f"{k}={v}\n" for k, v in secret_lines.items()))

            # -- MLflow: the backend and artifact store differ by profile; artifacts are always proxied by the server
            mlflow_env = {**base_env, **s3_env,
                          "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": _fernet_key(self.dir / "mlflow" / "webhook.key"),
                          "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                          "MLFLOW_WEBHOOK_CACHE_TTL": "2",
                          # MLflow's GenAI job runner (~10 huey consumer processes, ~240 MB each) is unused here
                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            if s3_env:
                mlflow_env["MLFLOW_S3_ENDPOINT_URL"] = s3_env["AWS_ENDPOINT_URL_S3"]
            (self.dir / "mlflow").mkdir(exist_ok=True)
            mlflow_proc, mlflow_log = self._start(
                state, "mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_backend,
                                  "--artifacts-destination", mlflow_artifacts, "--host", "127.0.0.1",
                                  "--port", str(ports["mlflow"]), "--workers", "1"], mlflow_env, self.dir / "mlflow")

            # -- Airflow: our DAGs unpaused, one known user; executor and database by profile
            home = self.dir / "airflow"
            af_env = {**base_env,
                      "AIRFLOW_HOME": str(home),
                      "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
                      "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                      "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                      "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                      "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "sarmerge:admin",
                      "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
                      "AIRFLOW__API__HOST": "127.0.0.1",
                      "AIRFLOW__API__PORT": str(ports["airflow"]),
                      "AIRFLOW__API__BASE_URL": urls["airflow"],
                      "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
                      "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}
            if production:
                af_env.update(self._celery_settings(state, secret_lines, db_urls["airflow"], broker, db_urls))
            else:
                af_env.update({
                    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                    # SQLite: writers wait for the lock instead of failing (sarmerge_airflow/sqlite.py)
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "sarmerge_airflow.sqlite.CONNECT_ARGS",
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "sarmerge_airflow.sqlite.ASYNC_CONNECT_ARGS"})
            self._airflow_cli(af_env, ["db", "migrate"], 600)
            self._airflow_cli(af_env, ["pools", "set", "gpu", "1", "GPU steps (one per GPU)"], 300)
            state["airflow_home"] = str(home)
            if production:
                # one process per component, as on separate hosts; the workers get the S3 credentials (DVC push)
                for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
                    cmd = [str(BIN / "airflow"), component] + (["--workers", "1"] if component == "api-server" else [])
                    self._start(state, component, cmd, af_env, home)
                gpu_queue = load_params(params_file).pipeline.gpu_queue
                concurrency = max(1, parallelism // len(WORKERS))
                for worker, queues in WORKERS.items():
                    worker_env = {**af_env, **s3_env, "SARMERGE_WORKER_HOSTNAME": worker,
                                  "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports[f"{worker}_log"])}
                    self._start(state, worker, [str(BIN / "airflow"), "celery", "worker",
                                                "--queues", queues.format(gpu=gpu_queue),
                                                "--concurrency", str(concurrency),
                                                "--celery-hostname", f"{worker}@%h",
                                                "--pid", str(home / f"{worker}.pid")], worker_env, home)
                af_proc, af_log = None, self.dir / "logs" / "scheduler.log"
            else:
                af_proc, af_log = self._start(state, "airflow", [str(BIN / "airflow"), "standalone"], af_env, home)

            _wait("MLflow", lambda: _ok(f"{urls['mlflow']}/health"), timeout, mlflow_proc, mlflow_log)

            from tasks.relay import AirflowClient

            def airflow_ready() -> bool:
                self._check_alive(state)
                health = _get(f"{urls['airflow']}/api/v2/monitor/health")
                return all(health.get(k, {}).get("status") == "healthy"
                           for k in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

            _wait("Airflow", airflow_ready, timeout, af_proc, af_log)
            api = AirflowClient(urls["airflow"], user="sarmerge", password=password)
            _wait("Airflow DAG merge_on_upload", lambda: api.request("GET", "/api/v2/dags/merge_on_upload"), timeout,
                  af_proc, af_log)
            if production:
                _wait("Celery workers", lambda: self._workers_ready(af_env), timeout, None,
                      self.dir / "logs" / "worker-gpu.log")

            # -- the relay (push path) and the MLflow webhook pointing at it
            if relay:
                relay_env = {**base_env, "AIRFLOW_API_URL": urls["airflow"], "AIRFLOW_API_USER": "sarmerge",
                             "AIRFLOW_API_PASSWORD": password, "SARMERGE_WEBHOOK_SECRET": webhook_secret}
                if relay_models:
                    relay_env["SARMERGE_RELAY_MODELS"] = relay_models
                proc, log = self._start(state, "relay", [sys.executable, "-m", "tasks.relay", "serve", "--port",
                                                         str(ports["relay"])], relay_env, REPO_ROOT)
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

    # -- production services ---------------------------------------------------------------------------------------
    def _start_databases(self, state: dict[str, Any],
                         secret_lines: dict[str, str]) -> tuple[dict[str, str], str]:
        """PostgreSQL (one database + role each for Airflow and MLflow) and Redis; returns the DB URLs, broker URL."""
        ports = state["ports"]
        pg_bin = _pg_bin()
        # initdb refuses root: as root, the cluster belongs to the `postgres` user (Debian creates it)
        pg_user = "postgres" if os.geteuid() == 0 else None
        pg_uid = pwd.getpwnam(pg_user).pw_uid if pg_user else os.geteuid()
        pg_dir = self.dir / "postgres"
        if not _reachable_by(self.dir, pg_uid):  # a private tmp dir it can reach, removed again by `down`
            pg_dir = Path(tempfile.mkdtemp(prefix="sarmerge-pg-"))
            state["postgres_tmp"] = str(pg_dir)
        pg_dir.mkdir(mode=0o700, exist_ok=True)
        (pg_dir / "run").mkdir(mode=0o700, exist_ok=True)
        superuser_pw = secrets.token_urlsafe(16)
        _write_secret(pg_dir / "pwfile", superuser_pw + "\n")
        if pg_user:
            for p in (pg_dir, pg_dir / "run", pg_dir / "pwfile"):
                os.chown(p, pg_uid, pwd.getpwnam(pg_user).pw_gid)
        data = pg_dir / "data"
        init = subprocess.run([str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile",
                               str(pg_dir / "pwfile"), "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                               "-E", "UTF8", "--no-instructions"], capture_output=True, text=True, timeout=300,
                              user=pg_user, group=pg_user, extra_groups=[] if pg_user else None, cwd=pg_dir)
        (pg_dir / "pwfile").unlink()
        if init.returncode != 0:
            raise SarmergeError(f"initdb failed: {init.stderr[-2000:]}")
        # fsync off: a test/loopback cluster (a real deployment keeps the defaults, docs/DEPLOY.md)
        proc, log = self._start(state, "postgres", [
            str(pg_bin / "postgres"), "-D", str(data), "-p", str(ports["postgres"]),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={pg_dir / 'run'}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=300"], {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}, pg_dir, pg_user)

        import psycopg2

        def connect() -> Any:
            try:
                return psycopg2.connect(host="127.0.0.1", port=ports["postgres"], user="postgres",
                                        password=superuser_pw, dbname="postgres", connect_timeout=5)
            except psycopg2.OperationalError:  # still starting
                return None

        conn = _wait("PostgreSQL", connect, 120, proc, log)
        urls = {}
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for db in ("airflow", "mlflow"):
                    pw = secrets.token_urlsafe(16)
                    cur.execute(f"CREATE ROLE {db} LOGIN PASSWORD %s", (pw,))
                    cur.execute(f"CREATE DATABASE {db} OWNER {db}")
                    urls[db] = f"postgresql+psycopg2://{db}:{pw}@127.0.0.1:{ports['postgres']}/{db}"
                    secret_lines[f"{db.upper()}_DATABASE_URL"] = urls[db]
        finally:
            conn.close()

        # Redis: the Celery broker; in memory only (no RDB/AOF files), password required
        redis_pw = secrets.token_urlsafe(16)
        (self.dir / "redis").mkdir(exist_ok=True)
        conf = self.dir / "redis" / "redis.conf"
        _write_secret(conf, f"bind 127.0.0.1\nport {ports['redis']}\nsave \"\"\nappendonly no\nprotected-mode yes\n"
                            f"dir {self.dir / 'redis'}\nrequirepass {redis_pw}\n")
        proc, log = self._start(state, "redis", [_need("redis-server", "apt-get install redis-server"), str(conf)],
                                {"PATH": os.environ.get("PATH", "")}, self.dir / "redis")
        broker = f"redis://:{redis_pw}@127.0.0.1:{ports['redis']}/0"
        secret_lines["CELERY_BROKER_URL"] = broker

        import redis

        def ping() -> bool:
            try:
                return bool(redis.Redis.from_url(broker, socket_timeout=5).ping())
            except redis.ConnectionError:  # still starting
                return False

        _wait("Redis", ping, 60, proc, log)
        return urls, broker

    def _start_s3(self, state: dict[str, Any], secret_lines: dict[str, str]) -> dict[str, str]:
        """An S3 server (moto, in memory) with the MLflow and DVC buckets; returns the S3 client environment."""
        port = state["ports"]["s3"]
        (self.dir / "s3").mkdir(exist_ok=True)
        proc, log = self._start(state, "s3", [_need("moto_server", "pip install moto[server]"), "-H", "127.0.0.1",
                                              "-p", str(port)], {**os.environ, "MOTO_DISABLE_TELEMETRY": "true"},
                                self.dir / "s3")
        env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
               "AWS_ACCESS_KEY_ID": f"sarmerge{secrets.token_hex(6)}",
               "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "AWS_DEFAULT_REGION": "us-east-1"}
        secret_lines.update(env)
        _wait("S3 server", lambda: _ok(f"{env['AWS_ENDPOINT_URL_S3']}/moto-api/"), 60, proc, log)
        s3 = s3_client(env)
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            s3.create_bucket(Bucket=bucket)
        return env

    def _params_with_s3_remote(self, params_file: Path) -> Path:
        """The stack's params.yaml: the given one with the DVC remote on the stack's S3 server (unless it names one)."""
        import yaml

        raw = yaml.safe_load(params_file.read_text())
        dvc_cfg = raw.setdefault("dvc", {}) or {}
        raw["dvc"] = dvc_cfg
        if not dvc_cfg.get("remote"):
            dvc_cfg["remote"] = f"s3://{DVC_BUCKET}/remote"
        out = self.dir / "params.yaml"
        out.write_text(f"# {params_file} with the DVC remote of this stack (tasks/stack.py)\n"
                       + yaml.safe_dump(raw, sort_keys=False))
        from tasks.merge import check_methods

        check_methods(load_params(out), str(params_file))  # fail now, naming the file, not in every DAG parse
        return out

    def _celery_settings(self, state: dict[str, Any], secret_lines: dict[str, str], metadata_db: str, broker: str,
                         db_urls: dict[str, str]) -> dict[str, str]:
        """CeleryExecutor on Redis with the PostgreSQL metadata DB; keys every component must share."""
        ports = state["ports"]
        shared = {"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                  "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                  "AIRFLOW__CORE__FERNET_KEY": _fernet_key(self.dir / "airflow" / "fernet.key")}
        secret_lines.update({k.removeprefix("AIRFLOW__").lower(): v for k, v in shared.items()})
        return {**shared,
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db_urls["airflow"].replace("+psycopg2", ""),
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{state['urls']['airflow']}/execution/",
                # each worker serves its task logs on its own port (set per worker); the triggerer on this one
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports["trigger_log"]),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "sarmerge_airflow.hostname.worker_hostname"}

    def _airflow_cli(self, env: dict[str, str], args: list[str], timeout: float) -> None:
        done = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SarmergeError(f"airflow {' '.join(args[:2])} failed: {done.stderr[-2000:]}")

    def _workers_ready(self, env: dict[str, str]) -> bool:
        """Every Celery worker answers a ping through the broker."""
        from celery import Celery

        app = Celery(broker=env["AIRFLOW__CELERY__BROKER_URL"])
        try:
            replies = app.control.ping(timeout=3) or []
        except Exception:  # broker or workers not up yet: _wait retries until its timeout
            return False
        finally:
            app.close()
        answered = {name.split("@")[0] for r in replies for name in r}
        return set(WORKERS) <= answered

    def _check_alive(self, state: dict[str, Any]) -> None:
        for name, pid in state["pids"].items():
            if not _group_alive(pid):
                log = self.dir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise SarmergeError(f"{name} exited while the stack was starting; log tail:\n{tail}")

    def kill(self, name: str) -> list[int]:
        """SIGKILL a service and every descendant, including those in other sessions (a step's own process group):
        what a lost host looks like. Returns the PIDs killed."""
        import psutil

        state = self.state()
        pid = state["pids"][name]
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:  # freeze first, so nothing forks or reacts while the tree is being killed
            with contextlib.suppress(psutil.Error):
                p.suspend()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return [p.pid for p in procs]

    def restart(self, name: str) -> int:
        """Start a stopped service again with the command and environment this process started it with."""
        if name not in self._specs:
            raise SarmergeError(f"{name}: not started by this process (restart works within the `up` process)")
        cmd, env, cwd = self._specs[name]
        state = self.state()
        proc, _ = self._start(state, name, cmd, env, cwd)
        return proc.pid

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def down(self, grace: float = 30.0) -> list[str]:
        """Stop every process group of the stack, clients before the services they use; each tier is stopped in
        parallel (SIGTERM to all, wait up to `grace`, SIGKILL what is left)."""
        if not self.state_file.exists():
            return []
        state = json.loads(self.state_file.read_text())
        pids = state.get("pids", {})
        tiers = [[n for n in pids if n not in STOP_TIERS_FLAT], *STOP_TIERS]
        stopped = []
        for tier in tiers:
            alive = {name: pids[name] for name in tier if name in pids and _group_alive(pids[name])}
            for pgid in alive.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
            for pgid in alive.values():
                stop_group(pgid, grace)  # waits for the SIGTERM already sent; the grace runs concurrently
            stopped += [f"{name} (pid {pid})" for name, pid in alive.items()]
        if state.get("postgres_tmp"):
            shutil.rmtree(state.pop("postgres_tmp"), ignore_errors=True)
        state["pids"] = {}
        self._save(state)
        return stopped

    def secrets(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (self.dir / "secrets.env").read_text().splitlines() if line)

    def env(self) -> dict[str, str]:
        """Environment for clients of this stack: tracking URI, params, Airflow credentials (no S3 credentials:
        MLflow proxies artifacts)."""
        state = self.state()
        values = self.secrets()
        return {"MLFLOW_TRACKING_URI": state["urls"]["mlflow"], "AIRFLOW_API_URL": state["urls"]["airflow"],
                "AIRFLOW_API_USER": values["AIRFLOW_API_USER"], "AIRFLOW_API_PASSWORD": values["AIRFLOW_API_PASSWORD"],
                "SARMERGE_PARAMS": state.get("params", "")}

    def s3_env(self) -> dict[str, str]:
        """S3 endpoint and credentials of the production profile (for `dvc pull`, listing buckets)."""
        values = self.secrets()
        keys = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        if "AWS_ENDPOINT_URL_S3" not in values:
            raise SarmergeError(f"{self.dir}: not a production stack (no S3 server)")
        return {k: values[k] for k in keys}


def s3_client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


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
    up = sub.add_parser("up", help="start the stack (embedded: MLflow, Airflow standalone, relay; production: "
                                   "PostgreSQL, Redis, S3, MLflow, Airflow on Celery with two workers, relay)")
    up.add_argument("--dir", required=True, type=Path)
    up.add_argument("--profile", choices=PROFILES, default="embedded",
                    help="embedded (SQLite, LocalExecutor; the demo) or production (docs/DEPLOY.md)")
    up.add_argument("--params", default=None, help="params.yaml for the pipeline (default: the repo's)")
    up.add_argument("--parallelism", type=int, default=DEFAULT_PARALLELISM,
                    help=f"Airflow core.parallelism (default {DEFAULT_PARALLELISM}: 2-4 by CPU count)")
    up.add_argument("--no-relay", action="store_true", help="watcher only, no webhook push path")
    for name in ("down", "status"):
        s = sub.add_parser(name)
        s.add_argument("--dir", required=True, type=Path)
    args = p.parse_args(argv)
    stack = Stack(args.dir)

    def body() -> int:
        if args.command == "up":
            state = stack.up(profile=args.profile, params=args.params, parallelism=args.parallelism,
                             relay=not args.no_relay)
            print(json.dumps({"urls": state["urls"], "pids": state["pids"], "started_in_s": state["started_in_s"]}))
        elif args.command == "down":
            stopped = stack.down()
            print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
        else:
            state = stack.state()
            alive = {k: _group_alive(v) for k, v in state.get("pids", {}).items()}
            print(json.dumps({"urls": state["urls"], "alive": alive}))
        return 0

    return run_cli("tasks.stack", body)


if __name__ == "__main__":
    sys.exit(main())
