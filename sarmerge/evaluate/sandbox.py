"""Run untrusted (model-generated) Python in a sandbox: one fresh process per sample, locked down by the OS.

Layers, strongest first (what this machine allows is probed once and reported as `Sandbox.isolation`):
- namespaces (`unshare` from util-linux): a new network namespace (no interfaces but a down loopback: no network),
  a new pid namespace (the program sees only its own processes, and all of them die with it), and a new mount
  namespace where every mount is read-only except the sample's scratch directory;
- as root, the program runs under a fresh random unprivileged uid, because the kernel never enforces RLIMIT_NPROC for
  root (a fork bomb would otherwise be unbounded);
- resource limits: CPU seconds, address space, file size, process count, open files, no core dumps;
- a wall-clock timeout that kills the whole process group;
- a scratch working directory, a scrubbed environment, `python -I` (isolated mode);
- a Python-level guard that turns shell-outs (`os.system`, `os.popen`, `subprocess`, exec/spawn, kill) into errors.
  It is defence in depth only: the tests show the OS layers contain code that bypasses it.

Without `unshare` the sandbox still runs with limits, a scratch dir and the guard, and says
`network_isolated: false` / `filesystem_isolated: false` in `isolation`, which every evaluation summary records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError

log = logging.getLogger(__name__)

BOOT = Path(__file__).with_name("_sandbox_boot.py")
SETUP_FAILURE_CODES = range(120, 127)
OUTPUT_KEEP = 4000  # characters of stdout/stderr kept per sample (the head and the tail)
UID_RANGE = (1_000_000, 1_900_000)  # fresh uids, no passwd entry, never owning anything outside a scratch dir

# Prepended to every program. Defence in depth, not the boundary (see module doc).
GUARD = '''\
def __sarmerge_guard():
    import os, posix, subprocess
    def blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError(name + " is disabled in the sarmerge sandbox")
        return refuse
    for mod in (os, posix):
        for name in ("system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
                     "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
                     "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg"):
            if hasattr(mod, name):
                setattr(mod, name, blocked(mod.__name__ + "." + name))
    for name in ("Popen", "call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, blocked("subprocess." + name))
__sarmerge_guard()
del __sarmerge_guard
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sample limits. `nproc` counts every process and thread of the sandbox's uid."""

    cpu_seconds: int = 10
    wall_seconds: float = 15.0
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    nproc: int = 16
    open_files: int = 256


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | sandbox_error
    returncode: int | None
    reason: str
    seconds: float
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class Isolation:
    """What the sandbox actually enforces on this machine (probed, not assumed)."""

    mode: str  # namespaces | namespaces-userns | rlimits
    network_isolated: bool
    filesystem_isolated: bool
    pid_namespace: bool
    uid_dropped: bool
    process_limit_enforced: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _clip(text: str) -> str:
    if len(text) <= OUTPUT_KEEP:
        return text
    half = OUTPUT_KEEP // 2
    return text[:half] + f"\n...[{len(text) - OUTPUT_KEEP} characters cut]...\n" + text[-half:]


def _signal_reason(sig: int) -> str:
    name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
    hint = {signal.SIGXCPU: " (CPU time limit)", signal.SIGXFSZ: " (file size limit)",
            signal.SIGKILL: " (killed: CPU hard limit or memory)", signal.SIGSEGV: " (crash, often the memory limit)"}
    return f"killed by {name}{hint.get(sig, '')}"


def _user_process_count(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("Uid:"):
                    count += int(line.split()[1]) == uid
                    break
        except OSError:
            continue
    return count


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class Sandbox:
    """Runs Python programs one process each; thread-safe, so `run_many` fans out over a small pool."""

    def __init__(self, limits: SandboxLimits | None = None, *, mode: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._root = os.geteuid() == 0
        self._unshare = shutil.which("unshare")
        self._python_prefix = Path(sys.base_prefix).resolve()
        real_python = Path(sys.executable).resolve()
        try:
            self._python_rel = real_python.relative_to(self._python_prefix)
        except ValueError:
            self._python_rel = None
        self.isolation = _probe(self, mode)

    # -- command construction -------------------------------------------------------------------------------------
    def _command(self, mode: str, run_dir: Path, program: str, limits: SandboxLimits) -> tuple[list[str], int | None]:
        work = run_dir / "work"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work),
               "TMPDIR": str(work), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        uid = None
        python = sys.executable
        nproc = limits.nproc
        lock_fs = mode.startswith("namespaces")
        python_src = python_dst = None
        if lock_fs and self._python_rel is not None:
            # the interpreter may live where an unprivileged uid cannot reach (e.g. /root/.pyenv):
            # show its installation read-only inside the run dir and run the bare stdlib interpreter from there
            python_src = str(self._python_prefix)
            python_dst = str(run_dir / "python")
            (run_dir / "python").mkdir()
            python = str(run_dir / "python" / self._python_rel)
            env["LD_LIBRARY_PATH"] = str(run_dir / "python" / "lib")
        if mode == "namespaces":
            uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
            os.chown(work, uid, uid)
        elif not self._root:
            # RLIMIT_NPROC counts all processes of the real uid, the caller's own included
            nproc += _user_process_count(os.getuid())
        cfg = {"work": str(work), "lock_fs": lock_fs, "python_src": python_src, "python_dst": python_dst,
               "uid": uid, "python": python, "program": "main.py", "env": env,
               "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes,
                          "file_size_bytes": limits.file_size_bytes, "nproc": nproc,
                          "open_files": limits.open_files}}
        boot = [sys.executable, "-I", "-S", str(BOOT), json.dumps(cfg)]
        if mode == "namespaces":
            prefix = [self._unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                      "--propagation", "private", "--"]
        elif mode == "namespaces-userns":
            prefix = [self._unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
                      "--mount-proc", "--propagation", "private", "--"]
        else:
            prefix = []
        (work / "main.py").write_text(GUARD + program)
        return prefix + boot, uid

    # -- running --------------------------------------------------------------------------------------------------
    def run(self, program: str, *, limits: SandboxLimits | None = None, mode: str | None = None) -> SandboxResult:
        """Run `program` (Python source) to completion or its limits; passed = exit status 0."""
        limits = limits or self.limits
        mode = mode or self.isolation.mode
        run_dir = Path(tempfile.mkdtemp(prefix="sarmerge-sandbox-"))
        os.chmod(run_dir, 0o755)
        work = run_dir / "work"
        work.mkdir(mode=0o700)
        uid = None
        start = time.perf_counter()
        try:
            cmd, uid = self._command(mode, run_dir, program, limits)
            # output goes to unlinked files outside the scratch dir (bounded by RLIMIT_FSIZE, never held in memory)
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work,
                                        env={"PATH": "/usr/bin:/bin"}, start_new_session=True, close_fds=True)
                timed_out = False
                try:
                    rc = proc.wait(timeout=limits.wall_seconds)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc.pid)
                    rc = proc.wait()
                _kill_group(proc.pid)  # stragglers that left the namespace-less group alive
                if uid is not None:
                    _kill_uid(uid)
                seconds = time.perf_counter() - start
                stdout, stderr = _read(out), _read(err)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        if timed_out:
            return SandboxResult(False, "timeout", None, f"wall timeout after {limits.wall_seconds:g}s", seconds,
                                 stdout, stderr)
        if rc == 0:
            return SandboxResult(True, "passed", 0, "exit 0", seconds, stdout, stderr)
        if rc in SETUP_FAILURE_CODES and "sarmerge sandbox setup:" in stderr:
            return SandboxResult(False, "sandbox_error", rc, stderr.strip().splitlines()[-1], seconds, stdout, stderr)
        if rc < 0:
            reason = _signal_reason(-rc)
        elif rc > 128:
            reason = _signal_reason(rc - 128)  # the boot process reports a signalled program as 128+signal
        else:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            reason = f"exit {rc}" + (f": {last}" if last else "")
        return SandboxResult(False, "failed", rc, reason, seconds, stdout, stderr)

    def run_many(self, programs: Sequence[str], *, workers: int | None = None,
                 on_done: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
        """Run programs in parallel processes (threads only wait on them); results in input order."""
        workers = workers or max(1, min(4, os.cpu_count() or 1))
        results: list[SandboxResult | None] = [None] * len(programs)

        def one(i: int) -> None:
            results[i] = self.run(programs[i])
            if on_done is not None:
                on_done(i, results[i])

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            for fut in [pool.submit(one, i) for i in range(len(programs))]:
                fut.result()
        return [r for r in results if r is not None]


def _read(f: Any) -> str:
    f.seek(0)
    data = f.read(OUTPUT_KEEP * 4 + 1)
    return _clip(data.decode("utf-8", "replace"))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """Kill whatever still runs as this run's private uid (processes that escaped the group, if no pid namespace)."""
    for _ in range(50):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    log.warning("sandbox uid %d still has processes after SIGKILL", uid)


# -- probing ----------------------------------------------------------------------------------------------------------
_PROBE_LOCK = threading.Lock()
_PROBED: dict[tuple, Isolation] = {}

PROBE_PROGRAM = """
import json, os, socket
result = {"uid": os.getuid()}
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    result["network_isolated"] = False
except OSError:
    result["network_isolated"] = True
try:
    open({outside!r}, "w").close()
    result["filesystem_isolated"] = False
except OSError:
    result["filesystem_isolated"] = True
result["pid_namespace"] = os.getpid() <= 2
print(json.dumps(result))
"""


def _candidate_modes(box: Sandbox) -> list[str]:
    modes = []
    if box._unshare:
        modes.append("namespaces" if box._root else "namespaces-userns")
    modes.append("rlimits")
    return modes


def _probe(box: Sandbox, forced: str | None) -> Isolation:
    """Find the strongest mode that works here by running a probe program in it (cached per process)."""
    key = (forced, box._root, box._unshare)
    with _PROBE_LOCK:
        if key in _PROBED:
            return _PROBED[key]
        modes = [forced] if forced else _candidate_modes(box)
        notes: list[str] = []
        for mode in modes:
            iso = _probe_mode(box, mode, notes)
            if iso is not None:
                if not (iso.network_isolated and iso.filesystem_isolated):
                    log.warning("sandbox: network_isolated=%s filesystem_isolated=%s (%s)", iso.network_isolated,
                                iso.filesystem_isolated, "; ".join(notes) or mode)
                _PROBED[key] = iso
                return iso
        raise SarmergeError(f"code sandbox cannot start on this machine: {'; '.join(notes)}")


def _probe_mode(box: Sandbox, mode: str, notes: list[str]) -> Isolation | None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outside_dir = Path(tempfile.mkdtemp(prefix="sarmerge-probe-"))
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        os.chmod(outside_dir, 0o1777)  # world-writable, like /tmp: only the mount lock may stop the write
        outside = outside_dir / "written-from-sandbox"
        program = PROBE_PROGRAM.replace("{port}", str(listener.getsockname()[1])).replace("{outside!r}",
                                                                                         repr(str(outside)))
        limits = SandboxLimits(cpu_seconds=10, wall_seconds=30)
        res = box.run(program, limits=limits, mode=mode)
        if not res.passed:
            notes.append(f"{mode}: {res.reason} {res.stderr.strip()[-300:]}".strip())
            return None
        try:
            seen = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            notes.append(f"{mode}: probe printed {res.stdout[-200:]!r}")
            return None
        fs_ok = seen["filesystem_isolated"] and not outside.exists()
        uid_dropped = mode == "namespaces"
        if mode == "rlimits":
            notes.append("no usable `unshare` (util-linux): no network/pid/mount namespaces")
        return Isolation(mode=mode, network_isolated=bool(seen["network_isolated"]), filesystem_isolated=fs_ok,
                         pid_namespace=bool(seen["pid_namespace"]), uid_dropped=uid_dropped,
                         process_limit_enforced=uid_dropped or not box._root, notes=list(notes))
    finally:
        listener.close()
        shutil.rmtree(outside_dir, ignore_errors=True)
