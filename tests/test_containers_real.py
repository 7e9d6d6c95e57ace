"""Real containers (`-m containers`): DockerOperator against podman's Docker API (SPEC §12), no mocks.

Needs podman and the CPU image, prepared once by `bash scripts/containers.sh build` (~6 min cold, seconds with cached
layers), and SARMERGE_CONTAINERS=1: without it the tier is skipped; with it, anything missing is a failure. Each
module starts its own `podman system service` on a temporary socket and stops it by PID.

The headline check: `merge_on_upload` run with `pipeline.runner: docker` (every step a container, the GPU step on the
CPU image without a device) writes merged weights with the same sha256 as the same DAG on the local runner. The
evaluation sandbox is checked inside step containers with the security options the runner renders (issue 11 item 5).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.containers import DOCKER_SANDBOX_SECURITY_OPT

pytestmark = [pytest.mark.containers, pytest.mark.pipeline]

IMAGE = os.environ.get("SARMERGE_CPU_IMAGE", "localhost/sarmerge-cpu:latest")
REPO = Path(__file__).resolve().parent.parent


def _require_tier() -> None:
    if os.environ.get("SARMERGE_CONTAINERS") != "1":
        pytest.skip("real-container tier: run `bash scripts/containers.sh build`, then set SARMERGE_CONTAINERS=1")
    if shutil.which("podman") is None:
        pytest.fail("SARMERGE_CONTAINERS=1 but podman is not installed: run `bash scripts/containers.sh build`")
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        pytest.fail(f"SARMERGE_CONTAINERS=1 but image {IMAGE} is missing: run `bash scripts/containers.sh build`")
    built = subprocess.run(["podman", "image", "inspect", "--format", '{{ index .Labels "sarmerge.source" }}', IMAGE],
                           capture_output=True, text=True).stdout.strip()
    if built != source_digest():
        pytest.fail(f"image {IMAGE} is stale (the sources changed since it was built): run "
                    "`bash scripts/containers.sh build` (seconds with cached layers)")


def source_digest() -> str:
    """What scripts/containers.sh labels the image with: sha256 of the `sha256sum` lines of the files it copies."""
    files = [f.relative_to(REPO).as_posix() for d in ("sarmerge", "tasks") for f in (REPO / d).rglob("*")
             if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
    files += ["pyproject.toml", "constraints.txt", "params.yaml", "dvc.yaml", "docker/sarmerge-step",
              "docker/Dockerfile.cpu"]
    lines = "".join(f"{hashlib.sha256((REPO / f).read_bytes()).hexdigest()}  {f}\n" for f in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`podman system service` on a fresh socket, started and stopped by its PID (its own process group)."""
    _require_tier()
    folder = tmp_path_factory.mktemp("podman")
    sock = folder / "podman.sock"
    log = open(folder / "service.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["podman", "system", "service", "--time", "0", f"unix://{sock}"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"podman system service did not open {sock}: {(folder / 'service.log').read_text()}")
            time.sleep(0.1)
        yield f"unix://{sock}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


def _container_params(params_file: Path, *, root: Path, family: str, docker_host: str, pull: str = "never",
                      runner: str = "docker") -> Path:
    from pipeline_support import write_params

    return write_params(
        params_file, root=root, family=family, trigger={"watcher": False}, pipeline={"runner": runner},
        containers={"cpu_image": IMAGE, "gpu_image": IMAGE, "gpus_per_step": 0,
                    "docker": {"url": docker_host, "pull": pull, "auto_remove": "force"}})


# -- the operator on its own -------------------------------------------------------------------------------------
def test_missing_image_fails_at_task_start_naming_the_setting(docker_host: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import DAG
    from airflow.sdk.exceptions import AirflowFailException

    from sarmerge_airflow.runner import Runner
    from tasks.params import load_params

    pfile = _container_params(tmp_path / "params.yaml", root=tmp_path / "root", family="ctm", docker_host=docker_host)
    monkeypatch.setenv("SARMERGE_PARAMS", str(pfile))
    monkeypatch.setenv("SARMERGE_CPU_IMAGE", "localhost/sarmerge-cpu:no-such-tag")
    monkeypatch.delenv("SARMERGE_PIPELINE_ROOT", raising=False)
    monkeypatch.delenv("SARMERGE_RUNNER", raising=False)
    with DAG("t_missing_image", schedule=None):
        op = Runner(load_params(pfile)).step("merge", "tasks.merge", ["--help"])
    with pytest.raises(AirflowFailException, match=r"containers\.cpu_image \(or \$SARMERGE_CPU_IMAGE\) = "
                                                   r"'localhost/sarmerge-cpu:no-such-tag': no such image"):
        op.execute({})


def test_step_runs_in_a_container_and_returns_its_result(docker_host: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A real step (tasks.merge on a workspace the local code built) in a container: result parsed, file written."""
    from airflow.sdk import DAG

    from sarmerge_airflow.runner import Runner
    from tasks.params import load_params

    root = tmp_path / "root"
    pfile = _container_params(tmp_path / "params.yaml", root=root, family="cts", docker_host=docker_host)
    monkeypatch.setenv("SARMERGE_PARAMS", str(pfile))
    monkeypatch.delenv("SARMERGE_PIPELINE_ROOT", raising=False)
    monkeypatch.delenv("SARMERGE_RUNNER", raising=False)
    out = root / "probe"
    script = (f"import json, os, sys, torch; from pathlib import Path; p = Path({str(out)!r}); p.mkdir(parents=True); "
              "(p / 'uid').write_text(str(os.getuid())); "
              "print('SARMERGE_RESULT ' + json.dumps({'torch': torch.__version__, 'python': sys.version[:4], "
              "'root': os.environ['SARMERGE_PIPELINE_ROOT']}))")
    with DAG("t_probe", schedule=None):
        op = Runner(load_params(pfile)).step("probe", "runpy", [])
    op.command = None
    op.step_command = lambda: ["python", "-c", script]  # the image's interpreter, same mounts and environment
    result = op.execute({})
    assert result == {"torch": "2.13.0+cpu", "python": "3.11", "root": str(root)}
    # files written on the shared root belong to the worker's user (containers.docker.user: worker)
    assert (out / "uid").read_text() == str(os.getuid())
    assert out.stat().st_uid == os.getuid()


# -- the DAG, local vs docker ----------------------------------------------------------------------------------------
def _merged_digests(root: Path) -> dict[str, str]:
    """method/file → sha256 of every merged weight file of every job under a pipeline root."""
    return {f"{f.parent.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.glob("workspaces/*/out/merged/*/*.safetensors"))}


def test_merge_on_upload_in_containers_matches_the_local_runner(docker_host: str, tmp_path: Path) -> None:
    """One setting (SARMERGE_RUNNER) moves every step of the real DAG into containers; the weights are identical.

    Each run gets its own MLflow server: the registry deduplicates checkpoints by content and processes each version
    once, so both runs must start from the same empty registry to plan the same job."""
    from pipeline_support import MlflowServer, airflow_env, dag_test, env_vars, make_family, migrate_airflow, register

    family = make_family(tmp_path / "family")
    digests, logs = {}, {}
    for runner in ("local", "docker"):
        root = tmp_path / runner / "pipeline"
        pfile = _container_params(tmp_path / runner / "params.yaml", root=root, family="ctr", docker_host=docker_host,
                                  runner="local")
        home = tmp_path / runner / "airflow"
        migrate_airflow(home)
        server = MlflowServer(tmp_path / runner / "mlflow")
        try:
            with env_vars(MLFLOW_TRACKING_URI=server.url):
                base = register(family["base"], "ctr-base", kind="base")
                register(family["math_s0"], "ctr-math", domain="math", base=base["uri"], calib=family["calib_math"])
                code = register(family["code_s0"], "ctr-code", domain="code", base=base["uri"],
                                calib=family["calib_code"])
            env = airflow_env(home, SARMERGE_PARAMS=str(pfile), SARMERGE_RUNNER=runner, DOCKER_HOST=docker_host,
                              MLFLOW_TRACKING_URI=server.url, SARMERGE_THREADS="1", OMP_NUM_THREADS="1")
            env.pop("SARMERGE_PIPELINE_ROOT", None)
            result = dag_test(REPO / "dags" / "merge_on_upload.py", env,
                              {"versions": [{"name": code["name"], "version": str(code["version"])}]}, timeout=1500)
        finally:
            server.stop()
        logs[runner] = result["log"]
        failed = {t: s for t, s in result["tis"].items() if s[0] not in ("success", "skipped")}
        assert result["state"] == "success" and not failed, f"{runner}: {failed}\n{result['log'][-6000:]}"
        assert any(t.startswith("merge[") for t in result["tis"]), f"{runner}: nothing was merged: {result['tis']}"
        digests[runner] = _merged_digests(root)
    # every step task instance of the docker run was one container of the image; none of the local run was
    steps = ("plan", "fisher", "evaluate_inputs", "merge", "evaluate", "analyze", "commit", "register", "promote",
             "finish")
    step_instances = [t for t in result["tis"] if t.split("[")[0] in steps]
    assert len(step_instances) == 15, step_instances  # 1 plan, 2 fisher, 3+2 evaluate, 2 merge, 5 per-job steps
    assert logs["docker"].count(f"in {IMAGE}") == len(step_instances), logs["docker"][-3000:]
    assert f"in {IMAGE}" not in logs["local"]
    assert set(digests["local"]) == {"sar/model.safetensors", "task_arithmetic/model.safetensors"}, digests["local"]
    assert digests["docker"] == digests["local"]


# -- the evaluation sandbox inside a step container (issue 11 item 5) -------------------------------------------------
# Runs inside the step container through the DockerOperator path: probes the sandbox, then runs hostile programs in it
# and checks from outside the sandbox (but inside the container) what they reached. Prints one SARMERGE_RESULT line.
SANDBOX_CHECK = r'''
import json, os, secrets, socket, tempfile, time
from dataclasses import replace
from pathlib import Path
from sarmerge.evaluate.sandbox import Sandbox

box = Sandbox()
out = {"caller_uid": os.getuid(), "isolation": box.isolation.as_dict(), "attacks": {}}
if box.isolation.mode == "bwrap":
    outside = Path(tempfile.mkdtemp(prefix="outside-"))
    os.chmod(outside, 0o1777)  # world-writable, like /tmp: only the sandbox may stop the write
    targets = [str(outside / "planted"), os.path.expanduser("~/planted"), "/tmp/planted",
               *[p + "/sarmerge-planted.pth" for p in __import__("site").getsitepackages()]]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    unix_path = str(outside / "host.sock")
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(unix_path)
    unix_listener.listen(1)
    unix_listener.setblocking(False)
    os.chmod(unix_path, 0o777)
    programs = {
        "remount": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
if libc.mount(None, b"/", None, ctypes.c_ulong(32 | 4096), None) == 0: print("ESCAPED remount / read-write")
if libc.umount2(b"/proc", 2) == 0: print("ESCAPED unmounted /proc")
if libc.unshare(0x00020000) == 0 and libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0: print("ESCAPED new mount ns")
for path in ("/sarmerge-planted", "/usr/sarmerge-planted", "/proc/sys/kernel/hostname"):
    try:
        with open(path, "a") as f: f.write("x")
        print("ESCAPED wrote", path)
    except OSError: pass
# a nested user namespace makes the program root there, but the sandbox's mounts stay locked read-only
if libc.unshare(0x10000000 | 0x00020000) == 0 and libc.mount(None, b"/", None, ctypes.c_ulong(32 | 4096), None) == 0:
    print("ESCAPED remount / read-write from a nested user namespace")
""",
        # judged from outside (`planted`): inside, /tmp is the sample's own scratch
        "write_outside": "import json\nfor p in json.loads(%r):\n    try:\n        open(p, 'w').write('x')\n"
                         "    except OSError: pass\n" % json.dumps(targets),
        "network": f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}), timeout=2); print("ESCAPED tcp connect")
except OSError: pass
try:
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect({unix_path!r}); print("ESCAPED unix connect")
except OSError: pass
try:
    socket.create_connection(("10.0.2.2", 80), timeout=2); print("ESCAPED outbound connect")
except OSError: pass
""",
        "environ": f"""
for pid in (1, {os.getpid()}, {os.getppid()}):
    try:
        print("environ", pid, open("/proc/%d/environ" % pid, "rb").read().decode(errors="replace"))
    except OSError: pass
""",
        "fork_bomb": """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""",
        "memory_6x200MiB": """
import os, time
kids = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        try:
            block = b"\\1" * (200 << 20)
            print("held 200 MiB", flush=True)
            time.sleep(3)
        except MemoryError:
            pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
""",
    }
    before = {p.name for p in Path("/proc").iterdir() if p.name.isdigit()}
    for name, program in programs.items():
        limits = replace(box.limits, wall_seconds=10, cpu_seconds=5, memory_bytes=150 << 20)
        res = box.run(program, limits=limits)
        time.sleep(0.5)  # a survivor would be running now
        alive = []  # processes the sample left behind, zombies included (pid, state, command)
        for pid in sorted({p.name for p in Path("/proc").iterdir() if p.name.isdigit()} - before):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                alive.append(f"{pid} {stat.rsplit(')', 1)[1].split()[0]} {stat.split('(', 1)[1].rsplit(')', 1)[0]}")
            except OSError:
                pass
        out["attacks"][name] = {"status": res.status, "reason": res.reason, "stdout": res.stdout[-2000:],
                                "stderr": res.stderr[-500:], "survivors": alive}
    accepted = 0
    for lst in (listener, unix_listener):
        try:
            lst.accept()
            accepted += 1
        except BlockingIOError:
            pass
    out["connections_accepted"] = accepted
    out["planted"] = [p for p in targets if os.path.exists(p)]
    out["own_environ_marker"] = "SARMERGE_PIPELINE_ROOT=" in open("/proc/%d/environ" % os.getpid()).read()
print("SARMERGE_RESULT " + json.dumps(out))
'''

GUARANTEES = ("network_isolated", "host_sockets_blocked", "filesystem_isolated", "mounts_locked", "pid_namespace",
              "ipc_namespace", "uid_unprivileged", "capabilities_dropped", "process_limit_enforced",
              "scratch_size_limited")


def _step_in_container(docker_host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], *,
                       user: str, sandbox: str, family: str = "ctb") -> Any:
    """Run `command` in a step container exactly as the runner renders it (security options from
    `containers.sandbox`, user from `containers.docker.user`); returns the step's SARMERGE_RESULT."""
    from airflow.sdk import DAG
    from pipeline_support import write_params

    from sarmerge_airflow.runner import Runner
    from tasks.params import load_params

    root = tmp_path / "root"
    pfile = write_params(tmp_path / "params.yaml", root=root, family=family, trigger={"watcher": False},
                         pipeline={"runner": "docker"},
                         containers={"cpu_image": IMAGE, "gpu_image": IMAGE, "gpus_per_step": 0, "sandbox": sandbox,
                                     "docker": {"url": docker_host, "pull": "never", "auto_remove": "force",
                                                "user": user}})
    monkeypatch.setenv("SARMERGE_PARAMS", str(pfile))
    monkeypatch.delenv("SARMERGE_PIPELINE_ROOT", raising=False)
    monkeypatch.delenv("SARMERGE_RUNNER", raising=False)
    with DAG(f"t_sandbox_{family}", schedule=None):
        op = Runner(load_params(pfile)).step("evaluate", "tasks.evaluate", [])
    assert (op.security_opt, op.unmask_proc) == ((list(DOCKER_SANDBOX_SECURITY_OPT), True) if sandbox == "isolated"
                                                 else ([], False))
    op.command = None
    op.step_command = lambda: command  # the image's interpreter, the evaluate step's mounts and security options
    return op.execute({})


@pytest.mark.parametrize("user", ["image", "0:0"], ids=["uid1000", "root"])
def test_sandbox_is_fully_isolated_in_a_step_container(docker_host: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, user: str) -> None:
    """containers.sandbox: isolated gives bubblewrap what it needs, as the image's uid 1000 and as root: every
    probed guarantee holds, and hostile programs reach nothing outside their sandbox."""
    result = _step_in_container(docker_host, tmp_path, monkeypatch, ["python", "-c", SANDBOX_CHECK], user=user,
                                sandbox="isolated")
    assert result["caller_uid"] == (1000 if user == "image" else 0)
    iso = result["isolation"]
    assert iso["mode"] == "bwrap" and iso["isolated"] is True, iso
    assert {k: iso[k] for k in GUARANTEES} == dict.fromkeys(GUARANTEES, True), iso
    attacks = result["attacks"]
    for name, seen in attacks.items():
        assert "ESCAPED" not in seen["stdout"], (name, seen)
        assert seen["status"] != "sandbox_error", (name, seen)  # the program really ran in the sandbox
        assert seen["survivors"] == [], (name, seen)  # nothing outlived the sample
    assert "SARMERGE_PIPELINE_ROOT" not in attacks["environ"]["stdout"], attacks["environ"]
    assert result["own_environ_marker"] is True  # the marker is there to be stolen: the sandbox kept it out of reach
    assert attacks["fork_bomb"]["status"] in ("timeout", "failed"), attacks["fork_bomb"]
    assert "held 200 MiB" not in attacks["memory_6x200MiB"]["stdout"], attacks["memory_6x200MiB"]
    assert result["connections_accepted"] == 0 and result["planted"] == [], result


def test_runtime_default_settings_make_code_suites_refuse(docker_host: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """containers.sandbox: runtime-default leaves the engine's seccomp/AppArmor/masked /proc: the sandbox falls back
    to rlimits, and a code suite refuses with one clear error unless unisolated execution is allowed."""
    from airflow.sdk.exceptions import AirflowException

    from sarmerge.zoo.tiny import save_checkpoint, tiny_model

    probe = _step_in_container(docker_host, tmp_path / "probe", monkeypatch, ["python", "-c", SANDBOX_CHECK],
                               user="image", sandbox="runtime-default", family="ctd")
    assert probe["isolation"]["mode"] == "rlimits" and probe["isolation"]["isolated"] is False, probe
    model, tok = tiny_model(seed=0)
    root = tmp_path / "eval" / "root"
    ckpt = save_checkpoint(model, tok, root / "model")
    out = root / "eval-out"
    command = ["sarmerge-step", "sarmerge", "evaluate", "--model", str(ckpt), "--suite", "humaneval", "--limit", "1",
               "--max-new-tokens", "4", "--out", str(out), "--no-progress"]
    with pytest.raises(AirflowException, match=r"refusing to run suites humaneval.*--allow-unisolated"):
        _step_in_container(docker_host, tmp_path / "eval", monkeypatch, command, user="worker",
                           sandbox="runtime-default", family="cte")
    assert not out.exists()
    _step_in_container(docker_host, tmp_path / "eval", monkeypatch, [*command, "--allow-unisolated"], user="worker",
                       sandbox="runtime-default", family="cte")
    sandbox = json.loads((out / "summary.json").read_text())["sandbox"]
    assert sandbox["mode"] == "rlimits" and sandbox["isolated"] is False and sandbox["allow_unisolated"] is True
