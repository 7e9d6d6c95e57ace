"""Run untrusted (model-generated) Python in a sandbox: one fresh process tree per sample, locked down by the OS.

Modes (the strongest this machine allows is probed once; every guarantee is checked by a probe action and reported
in `Sandbox.isolation`, which every evaluation summary records):

- `bwrap` (Debian's bubblewrap): new user, pid, network, IPC, UTS and cgroup namespaces; a new root that holds only
  read-only binds of what Python needs (/usr, the interpreter prefix, the venv for sandboxed scorers) and the
  sample's files (/sandbox, read-only), a size-limited tmpfs at /tmp (the only writable place, the cwd), a fresh
  /proc and a read-only minimal /dev. The program runs as an unprivileged uid with every capability dropped: the
  caller's own uid, or, when the caller is root, a fresh random uid on the host too (setpriv before an unprivileged
  bwrap; never a root-run bwrap, whose sandbox would stay host uid 0). It cannot remount, unmount, write /proc/sys,
  ptrace out or reach any host path, socket or SysV IPC object.
  No network interface but a down loopback. As root, an aggregate cgroup (v1 or v2) caps the
  memory (tmpfs pages included) and the process count of the whole sample; as non-root, RLIMIT_AS caps each
  process and RLIMIT_NPROC the count. Everything dies with the sample (pid namespace, --die-with-parent).
- `rlimits` (no namespace can be made, e.g. Docker's default seccomp): only resource limits, a scratch dir, a
  scrubbed environment, `python -I` and a Python-level guard. Network, host files the uid can write, same-uid
  /proc/<pid>/environ, kill/ptrace and daemons all stay reachable: code suites refuse to run in this mode unless
  unisolated execution is explicitly allowed (`allow_unisolated`).

Both modes: CPU seconds, address space, file size, process count, open files, no core dumps, a wall-clock timeout
that kills the whole tree, and output kept bounded. The guard (`GUARD`) is defence in depth only.

`SARMERGE_SANDBOX_MODE=rlimits` forces a mode (tests use it to exercise the refusal).
"""

from __future__ import annotations

import contextlib
import ctypes
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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError

log = logging.getLogger(__name__)

BOOT = Path(__file__).with_name("_sandbox_boot.py")
MODES = ("bwrap", "rlimits")
MODE_ENV = "SARMERGE_SANDBOX_MODE"
SETUP_FAILURE_CODES = range(120, 127)
OUTPUT_KEEP = 4000  # characters of stdout/stderr kept per sample (the head and the tail)
REPORT_MAX = 64 << 10  # bytes of a harness report the host reads at most
UID_RANGE = (1_000_000, 1_900_000)  # fresh uids, no passwd entry, never owning anything outside a scratch dir
INSIDE_FILES = "/sandbox"
INSIDE_SCRATCH = "/tmp"
# Root stage (private mount namespace): bind N (source, target) pairs, then exec the rest of the command line.
BIND_SCRIPT = ('n=$1; shift; i=0; while [ "$i" -lt "$n" ]; do mount --bind "$1" "$2" || exit 121; shift 2; '
               'i=$((i+1)); done; exec "$@"')

# Prepended to `run` programs. Defence in depth, not the boundary (see module doc).
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
    """Per-sample limits. `memory_bytes` caps each process's address space and, where a cgroup can be made, the
    whole sample's memory (scratch tmpfs included); `nproc` bounds the sample's processes and threads."""

    cpu_seconds: int = 10
    wall_seconds: float = 15.0
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    scratch_bytes: int = 64 << 20
    nproc: int = 16
    open_files: int = 256


@dataclass
class SandboxResult:
    passed: bool  # `run`: exit status 0. Harness jobs never use this as a verdict (see harness.py)
    status: str  # passed | failed | timeout | sandbox_error
    returncode: int | None
    reason: str
    seconds: float
    stdout: str = ""
    stderr: str = ""
    report: str | None = None  # what the trusted harness wrote on its private channel (harness jobs)


@dataclass(frozen=True)
class Isolation:
    """What the sandbox enforces on this machine: each boolean is the outcome of a probe action, not an assumption."""

    mode: str  # bwrap | rlimits
    isolated: bool  # every guarantee below holds: code suites may run without allow_unisolated
    network_isolated: bool  # TCP connect to a host listener on 127.0.0.1 failed
    host_sockets_blocked: bool  # connect to a host AF_UNIX listener failed
    filesystem_isolated: bool  # writes to a world-writable host dir and .pth files in every site dir failed
    mounts_locked: bool  # remounting / read-write, unmounting /proc, writing /, /dev and /proc/sys all failed
    pid_namespace: bool  # the host's processes (the caller) are invisible
    ipc_namespace: bool  # a SysV shm segment / message queue made inside did not appear on the host
    uid_unprivileged: bool  # the program's uid is not 0 (and a fresh uid when the caller is root)
    capabilities_dropped: bool  # CapEff is 0
    process_limit_enforced: bool  # forking past the sample's process cap failed
    scratch_size_limited: bool  # filling the scratch dir with small files hit ENOSPC at its size
    memory_cap: str  # cgroup-v1 | cgroup-v2 (aggregate, the sample was seen charged) | rlimit-per-process
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def uid_dropped(self) -> bool:  # the name earlier summaries used
        return self.uid_unprivileged


def _clip(text: str, keep: int = OUTPUT_KEEP) -> str:
    if len(text) <= keep:
        return text
    half = keep // 2
    return text[:half] + f"\n...[{len(text) - keep} characters cut]...\n" + text[-half:]


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


# -- cgroups (aggregate memory and process caps, root only) -------------------------------------------------------
class _Cgroup:
    """One sample's cgroup(s): v1 memory+pids hierarchies or one v2 group. `create` returns None where none is
    writable (non-root, read-only /sys/fs/cgroup, controllers not delegated)."""

    V1 = Path("/sys/fs/cgroup")

    def __init__(self, kind: str, dirs: list[Path]) -> None:
        self.kind = kind
        self.dirs = dirs

    @classmethod
    def create(cls, limits: SandboxLimits) -> _Cgroup | None:
        if os.geteuid() != 0:
            return None
        name = f"sarmerge-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        pids_max = str(limits.nproc + 6)  # + bwrap's two processes, the boot/harness and the candidate
        v2 = cls.V1 / "cgroup.controllers"
        if v2.exists():
            group = cls.V1 / name
            return cls._try("cgroup-v2", [(group, [("memory.max", str(limits.memory_bytes)),
                                                   ("memory.swap.max", "0"), ("pids.max", pids_max)])])
        mem, pids = cls.V1 / "memory", cls.V1 / "pids"
        if (mem / "memory.limit_in_bytes").exists() and (pids / "cgroup.procs").exists():
            return cls._try("cgroup-v1", [
                (mem / name, [("memory.limit_in_bytes", str(limits.memory_bytes)),
                              ("memory.memsw.limit_in_bytes", str(limits.memory_bytes))]),
                (pids / name, [("pids.max", pids_max)])])
        return None

    @classmethod
    def _try(cls, kind: str, plan: list[tuple[Path, list[tuple[str, str]]]]) -> _Cgroup | None:
        made: list[Path] = []
        try:
            for group, settings in plan:
                group.mkdir()
                made.append(group)
                for name, value in settings:
                    target = group / name
                    if name in ("memory.memsw.limit_in_bytes", "memory.swap.max") and not target.exists():
                        continue  # no swap accounting: the memory limit alone binds
                    target.write_text(value)
        except OSError as e:
            log.debug("sandbox: no %s (%s)", kind, e)
            cls(kind, made).remove()
            return None
        return cls(kind, made)

    def join_command(self) -> list[str]:
        """A prefix that moves itself into every group, then execs the rest (so no process starts outside)."""
        script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *[str(d / "cgroup.procs") for d in self.dirs], "--"]

    def charged(self) -> bool:
        """The sample's memory was accounted here (it really ran inside the group)."""
        for d in self.dirs:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                with contextlib.suppress(OSError, ValueError):
                    return int((d / name).read_text().split()[0]) > 0
        return False

    def memory_exceeded(self) -> bool:
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                if (d / "memory.failcnt").exists():
                    return int((d / "memory.failcnt").read_text()) > 0
                events = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
                return int(events.get("oom_kill", 0)) > 0 or int(events.get("max", 0)) > 0
        return False

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(100):
                with contextlib.suppress(OSError):
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                log.warning("sandbox: cannot remove cgroup %s", d)


# -- the sandbox --------------------------------------------------------------------------------------------------
class Sandbox:
    """Runs Python programs one process tree each; thread-safe, so `run_many` fans out over a small pool."""

    def __init__(self, limits: SandboxLimits | None = None, *, mode: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._root = os.geteuid() == 0
        self._bwrap = shutil.which("bwrap")
        self._unshare = shutil.which("unshare")
        self._setpriv = shutil.which("setpriv")
        self._python = str(Path(sys.executable).resolve())
        self._venv_python = sys.executable  # keeps the venv (pyvenv.cfg) when sandboxed scorers need it
        self._python_prefix = Path(sys.base_prefix).resolve()
        self._venv = Path(sys.prefix)
        forced = mode or os.environ.get(MODE_ENV) or None
        if forced is not None and forced not in MODES:
            raise SarmergeError(f"sandbox mode {forced!r}: expected one of {', '.join(MODES)}")
        self.isolation = _probe(self, forced)

    def require_isolation(self, allow_unisolated: bool, what: str = "code suites") -> None:
        """Refuse (one SarmergeError) to run hostile code without isolation unless that was explicitly allowed."""
        if self.isolation.isolated or allow_unisolated:
            if not self.isolation.isolated:
                log.warning("sandbox: running %s UNISOLATED (mode %s), as explicitly allowed", what,
                            self.isolation.mode)
            return
        missing = [k for k, v in self.isolation.as_dict().items() if v is False]
        raise SarmergeError(
            f"refusing to run {what}: the sandbox cannot isolate model-generated code on this machine "
            f"(mode {self.isolation.mode}; missing: {', '.join(missing) or 'unknown'}; "
            f"{'; '.join(self.isolation.notes)}). Install bubblewrap and allow user namespaces (see README "
            "'Security'), or accept the risk with allow_unisolated=True / --allow-unisolated / "
            "params.yaml evaluate.allow_unisolated: true")

    # -- command construction -------------------------------------------------------------------------------------
    def _bwrap_command(self, run_dir: Path, limits: SandboxLimits, uid: int | None, venv: bool) -> list[str]:
        """bwrap's command line; as root, prefixed by a private-mount-namespace stage that makes the interpreter
        reachable for the fresh uid and drops to it (so the sandbox's uid is unprivileged on the host too: a
        root-run bwrap would leave it host uid 0, which may write global /proc/sys entries and skips RLIMIT_NPROC)."""
        binds = [self._python_prefix] + ([self._venv] if venv else [])
        binds = [p for p in binds if p != Path("/usr") and Path("/usr") not in p.parents]  # /usr is bound anyway
        stage: list[str] = []
        sources = {str(p): str(p) for p in binds}
        if uid is not None:
            pairs: list[str] = []
            for k, path in enumerate(p for p in binds if not _world_reachable(p)):
                # the prefix may sit under a 0700 /root: bind it (as root, in a private mount namespace) onto a dir
                # of this run that the fresh uid can traverse, and let bwrap bind that one
                target = run_dir / f"bind{k}"
                target.mkdir(mode=0o755)
                pairs += [str(path), str(target)]
                sources[str(path)] = str(target)
            if pairs:  # needs CAP_SYS_ADMIN (root on a host; not root in a default Docker container)
                stage = [self._unshare or "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                         BIND_SCRIPT, "sh", str(len(pairs) // 2), *pairs]
            stage += [self._setpriv or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                      "--inh-caps=-all", "--bounding-set=-all", "--"]
        # --as-pid-1: the boot is the namespace's init (see _sandbox_boot.py), not bwrap's dumpable reaper
        cmd = [*stage, self._bwrap or "bwrap", "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session",
               "--cap-drop", "ALL", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                cmd += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                cmd += ["--ro-bind", top, top]
        # the scratch tmpfs goes first: bwrap mounts in order, and a venv or interpreter under /tmp (a CI checkout,
        # say) must be bound on top of it, not hidden by it
        cmd += ["--size", str(limits.scratch_bytes), "--tmpfs", INSIDE_SCRATCH]
        for path in binds:
            cmd += ["--ro-bind", sources[str(path)], str(path)]
        cmd += ["--ro-bind", str(run_dir / "files"), INSIDE_FILES, "--proc", "/proc", "--dev", "/dev",
                # /dev is a tmpfs without a size: read-only, with a small /dev/shm for POSIX semaphores
                "--size", str(1 << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
                "--remount-ro", "/", "--chdir", INSIDE_SCRATCH, "--clearenv"]
        return cmd

    def _env(self, scratch: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": scratch,
                "TMPDIR": scratch, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
                "LD_LIBRARY_PATH": str(self._python_prefix / "lib")}

    # -- running --------------------------------------------------------------------------------------------------
    def run(self, program: str, *, limits: SandboxLimits | None = None, mode: str | None = None) -> SandboxResult:
        """Run `program` (Python source, the guard prepended) to completion or its limits; passed = exit status 0.
        Use it for programs whose exit status is trusted (probes); code verdicts come from `harness.py`."""
        return self.execute({"main.py": GUARD + program}, lambda files: [files + "/main.py"], limits=limits,
                            mode=mode)

    def execute(self, files: Mapping[str, str], argv: Callable[[str], list[str]], *,
                limits: SandboxLimits | None = None, mode: str | None = None, stdin: bytes | None = None,
                report: bool = False, venv: bool = False,
                on_group: Callable[[_Cgroup], None] | None = None) -> SandboxResult:
        """Run `python -I <argv(files_dir)>` over `files` (written read-only to the sandbox's files dir).

        `stdin` feeds the first process (e.g. trusted test code the program must not read from a file);
        `report=True` gives it a private pipe (its fd number is in env SARMERGE_REPORT_FD) whose content comes back
        as `result.report`; `venv=True` runs the venv's interpreter with its site-packages visible (scorers)."""
        limits = limits or self.limits
        mode = mode or self.isolation.mode
        boxed = mode == "bwrap"
        run_dir = Path(tempfile.mkdtemp(prefix="sarmerge-sandbox-"))
        os.chmod(run_dir, 0o755)
        files_dir = run_dir / "files"
        files_dir.mkdir(mode=0o755)
        for name, text in files.items():
            (files_dir / name).write_text(text)
            os.chmod(files_dir / name, 0o644)
        if boxed:
            files_path, scratch = INSIDE_FILES, INSIDE_SCRATCH
        else:
            files_path = str(files_dir)
            work = run_dir / "work"
            work.mkdir(mode=0o700)
            scratch = str(work)
        group = _Cgroup.create(limits) if boxed else None
        report_r = report_w = None
        start = time.perf_counter()
        try:
            nproc = limits.nproc
            if not boxed or not self._root:
                # RLIMIT_NPROC counts all processes of the real uid, the caller's own included
                nproc += _user_process_count(os.getuid())
            uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) if boxed and self._root else None
            env = self._env(scratch)
            pass_fds: list[int] = []
            if report:
                report_r, report_w = os.pipe()
                pass_fds.append(report_w)
                env["SARMERGE_REPORT_FD"] = str(report_w)
            python = self._venv_python if venv else self._python
            cfg = {"python": python, "argv": [python, "-I", "-B", *argv(files_path)], "env": env, "cwd": scratch,
                   "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes,
                              "file_size_bytes": limits.file_size_bytes, "nproc": nproc,
                              "open_files": limits.open_files}, "init": boxed}
            boot = [self._python, "-I", "-S", "-B", files_path + "/_sandbox_boot.py", json.dumps(cfg)]
            shutil.copyfile(BOOT, files_dir / "_sandbox_boot.py")
            os.chmod(files_dir / "_sandbox_boot.py", 0o644)
            cmd = [*self._bwrap_command(run_dir, limits, uid, venv), "--", *boot] if boxed else boot
            if group is not None:
                cmd = group.join_command() + cmd
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                        stdout=out, stderr=err, cwd=scratch if not boxed else run_dir,
                                        env={"PATH": "/usr/bin:/bin"}, start_new_session=True, close_fds=True,
                                        pass_fds=pass_fds)
                if report_w is not None:
                    os.close(report_w)
                    report_w = None
                reader = _ReportReader(report_r) if report_r is not None else None
                if stdin is not None:
                    threading.Thread(target=_feed, args=(proc, stdin), daemon=True).start()
                timed_out = False
                try:
                    rc = proc.wait(timeout=limits.wall_seconds)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc.pid)
                    rc = proc.wait()
                _kill_group(proc.pid)  # stragglers that left the namespace-less group alive
                memory_hit = group is not None and group.memory_exceeded()
                if group is not None and on_group is not None:
                    on_group(group)
                if group is not None:
                    group.remove()
                    group = None
                seconds = time.perf_counter() - start
                report_text = reader.result() if reader is not None else None
                stdout, stderr = _read(out), _read(err)
        finally:
            for fd in (report_r, report_w):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if group is not None:
                group.remove()
            shutil.rmtree(run_dir, ignore_errors=True)
        if timed_out:
            return SandboxResult(False, "timeout", None, f"wall timeout after {limits.wall_seconds:g}s", seconds,
                                 stdout, stderr, report_text)
        if rc == 0:
            return SandboxResult(True, "passed", 0, "exit 0", seconds, stdout, stderr, report_text)
        if rc in SETUP_FAILURE_CODES and "sarmerge sandbox setup:" in stderr:
            return SandboxResult(False, "sandbox_error", rc, stderr.strip().splitlines()[-1], seconds, stdout, stderr,
                                 report_text)
        if rc == 1 and stderr.startswith("bwrap:"):
            return SandboxResult(False, "sandbox_error", rc, stderr.strip().splitlines()[0], seconds, stdout, stderr)
        if rc < 0:
            reason = _signal_reason(-rc)
        elif rc > 128:
            reason = _signal_reason(rc - 128)  # the boot process reports a signalled program as 128+signal
        else:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            reason = f"exit {rc}" + (f": {last}" if last else "")
        if memory_hit:
            reason += " (aggregate memory cap reached)"
        return SandboxResult(False, "failed", rc, reason, seconds, stdout, stderr, report_text)

    def run_many(self, programs: Sequence[str], *, workers: int | None = None,
                 on_done: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
        """Run programs in parallel sandboxes (threads only wait on them); results in input order."""
        return self.map(self.run, programs, workers=workers, on_done=on_done)

    def map(self, fn: Callable[[Any], SandboxResult], jobs: Sequence[Any], *, workers: int | None = None,
            on_done: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
        """`fn(job)` for each job on a small thread pool (each call runs its own sandbox); results in input order."""
        workers = workers or max(1, min(4, os.cpu_count() or 1))
        results: list[SandboxResult | None] = [None] * len(jobs)

        def one(i: int) -> None:
            results[i] = fn(jobs[i])
            if on_done is not None:
                on_done(i, results[i])

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            for fut in [pool.submit(one, i) for i in range(len(jobs))]:
                fut.result()
        return [r for r in results if r is not None]


def _world_reachable(path: Path) -> bool:
    """Every ancestor searchable and `path` readable+searchable by others (a fresh uid can bind it)."""
    try:
        for p in [path, *path.parents]:
            mode = p.stat().st_mode
            if not mode & 0o001 or (p == path and not mode & 0o004):
                return False
    except OSError:
        return False
    return True


class _ReportReader:
    """Drains the harness's private pipe in a thread (bounded), so a chatty harness can never block on it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        size = 0
        with contextlib.suppress(OSError):
            while True:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    return
                if size < REPORT_MAX:
                    self._chunks.append(chunk[:REPORT_MAX - size])
                    size += len(chunk)

    def result(self) -> str:
        self._thread.join(timeout=5)
        return b"".join(self._chunks).decode("utf-8", "replace")


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()


def _read(f: Any) -> str:
    f.seek(0)
    data = f.read(OUTPUT_KEEP * 4 + 1)
    return _clip(data.decode("utf-8", "replace"))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# -- probing ----------------------------------------------------------------------------------------------------------
_PROBE_LOCK = threading.Lock()
_PROBED: dict[tuple, Isolation] = {}

# Each reported guarantee is the outcome of one of these actions (run inside the sandbox, results on stdout).
PROBE_PROGRAM = r"""
import ctypes, errno, json, os, socket
cfg = json.loads(__CFG__)
libc = ctypes.CDLL(None, use_errno=True)
out = {"uid": os.getuid()}
def fails(action):
    try:
        action()
        return False
    except OSError:
        return True
def tcp():
    socket.create_connection(("127.0.0.1", cfg["port"]), timeout=2).close()
out["network_isolated"] = fails(tcp)
def unix():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(cfg["unix"])
    finally:
        s.close()
out["host_sockets_blocked"] = fails(unix)
def write(path):
    def act():
        with open(path, "w") as f:
            f.write("# sarmerge sandbox probe (a comment: inert even if it landed)\n")
    return act
out["filesystem_isolated"] = all(fails(write(p)) for p in cfg["outside"])
def remount():
    if libc.mount(None, b"/", None, ctypes.c_ulong(32 | 4096), None) != 0:  # MS_REMOUNT|MS_BIND, read-write
        raise OSError(ctypes.get_errno(), "mount")
def umount():
    if libc.umount2(b"/proc", 2) != 0:  # MNT_DETACH
        raise OSError(ctypes.get_errno(), "umount")
def same_hostname():  # writes back the value it read: harmless even where it succeeds
    with open("/proc/sys/kernel/hostname") as f:
        value = f.read()
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(value)
out["mounts_locked"] = (fails(remount) and fails(umount) and fails(write("/sarmerge-root-probe"))
                        and fails(write("/dev/sarmerge-probe")) and fails(same_hostname))
def caller_visible():
    # the caller itself, not a sandbox process that has its pid number (a caller that is pid 1 of a container
    # shares that number with the sandbox's own init): same pid and same start time
    try:
        with open("/proc/%d/stat" % cfg["host_pid"]) as f:
            return f.read().rsplit(")", 1)[1].split()[19] == cfg["host_start"]
    except (OSError, IndexError):
        return False
def environ():
    if not caller_visible():
        raise OSError("the caller is not visible")
    open("/proc/%d/environ" % cfg["host_pid"], "rb").read()
out["pid_namespace"] = fails(environ) and not caller_visible()
libc.shmget.restype = ctypes.c_int
libc.msgget.restype = ctypes.c_int
out["shm"] = libc.shmget(cfg["ipc_key"], 4096, 0o1600) >= 0  # IPC_CREAT
out["msg"] = libc.msgget(cfg["ipc_key"], 0o1600) >= 0
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff:")]
out["cap_eff"] = int(caps[0].split()[1], 16) if caps else -1
pids, children = 0, []
for _ in range(cfg["forks"]):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        import time
        time.sleep(20)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
out["forked"] = len(children)
written, full = 0, False
try:
    for i in range(cfg["fill_files"]):
        with open("fill%d" % i, "wb") as f:
            f.write(b"\0" * cfg["fill_chunk"])
        written += cfg["fill_chunk"]
except OSError as e:
    full = e.errno == errno.ENOSPC
out["scratch_full"] = full
out["scratch_written"] = written
print(json.dumps(out))
"""


def _candidate_modes(box: Sandbox) -> list[str]:
    # as root, bwrap runs under a fresh uid, which takes util-linux's setpriv (and unshare for unreachable prefixes)
    usable = box._bwrap and (not box._root or (box._unshare and box._setpriv))
    return (["bwrap"] if usable else []) + ["rlimits"]


def _probe(box: Sandbox, forced: str | None) -> Isolation:
    """Find the strongest mode that works here by running the probe program in it (cached per process)."""
    key = (forced, box._root, box._bwrap, box.limits.nproc)
    with _PROBE_LOCK:
        if key in _PROBED:
            return _PROBED[key]
        notes: list[str] = []
        if forced is None and "bwrap" not in _candidate_modes(box):
            notes.append("bubblewrap (bwrap) not found" + (" (or, as root, util-linux unshare/setpriv)" if box._root
                                                            else "") + ": no namespaces")
        for mode in [forced] if forced else _candidate_modes(box):
            iso = _probe_mode(box, mode, notes)
            if iso is not None:
                if not iso.isolated:
                    log.warning("sandbox: mode %s does not isolate: %s (%s)", mode,
                                {k: v for k, v in iso.as_dict().items() if v is False}, "; ".join(iso.notes))
                _PROBED[key] = iso
                return iso
        raise SarmergeError(f"code sandbox cannot start on this machine: {'; '.join(notes)}")


def _site_dirs() -> list[Path]:
    import site
    import sysconfig

    dirs = {Path(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    dirs |= {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    return sorted(dirs)


def _probe_mode(box: Sandbox, mode: str, notes: list[str]) -> Isolation | None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unix_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside_dir = Path(tempfile.mkdtemp(prefix="sarmerge-probe-"))
    ipc_key = secrets.randbelow(1 << 30) + 1
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        os.chmod(outside_dir, 0o1777)  # world-writable, like /tmp: only the mount lock may stop the write
        unix_path = outside_dir / "host.sock"
        unix_listener.bind(str(unix_path))
        unix_listener.listen(1)
        os.chmod(unix_path, 0o777)
        pth_name = f"sarmerge-probe-{secrets.token_hex(4)}.pth"
        outside = [outside_dir / "written-from-sandbox", *(d / pth_name for d in _site_dirs())]
        chunk = 256 << 10
        limits = replace(box.limits, cpu_seconds=10, wall_seconds=60, scratch_bytes=2 << 20, nproc=6,
                         file_size_bytes=1 << 20, memory_bytes=max(box.limits.memory_bytes, 512 << 20))
        forks = 12
        cfg = {"port": listener.getsockname()[1], "unix": str(unix_path), "outside": [str(p) for p in outside],
               "host_pid": os.getpid(), "host_start": _start_time(os.getpid()), "ipc_key": ipc_key, "forks": forks,
               "fill_files": 12, "fill_chunk": chunk}
        program = PROBE_PROGRAM.replace("__CFG__", repr(json.dumps(cfg)))
        group_probe: list[bool] = []
        res = _run_probe(box, program, limits, mode, group_probe)
        if not res.passed:
            notes.append(f"{mode}: {res.reason} {res.stderr.strip()[-300:]}".strip())
            return None
        try:
            seen = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            notes.append(f"{mode}: probe printed {res.stdout[-200:]!r}")
            return None
        leaked = [p for p in outside if p.exists()]
        for p in leaked:
            with contextlib.suppress(OSError):
                p.unlink()
        ipc_leaked = _ipc_visible(ipc_key)
        memory_cap = "rlimit-per-process"
        if group_probe and group_probe[0]:
            memory_cap = group_probe[1] if len(group_probe) > 1 else "cgroup"
        fields = {
            "network_isolated": bool(seen["network_isolated"]),
            "host_sockets_blocked": bool(seen["host_sockets_blocked"]),
            "filesystem_isolated": bool(seen["filesystem_isolated"]) and not leaked,
            "mounts_locked": bool(seen["mounts_locked"]),
            "pid_namespace": bool(seen["pid_namespace"]),
            "ipc_namespace": bool(seen["shm"] and seen["msg"]) and not ipc_leaked,
            "uid_unprivileged": seen["uid"] != 0 and (mode != "bwrap" or not box._root
                                                       or UID_RANGE[0] <= seen["uid"] < UID_RANGE[1]),
            "capabilities_dropped": seen["cap_eff"] == 0,
            "process_limit_enforced": seen["forked"] < forks,
            "scratch_size_limited": bool(seen["scratch_full"]) and seen["scratch_written"] <= limits.scratch_bytes,
        }
        if mode == "rlimits":
            notes.append("rlimits: no namespaces (network, host files, same-uid processes and IPC reachable)")
        if leaked:
            notes.append(f"{mode}: probe wrote outside its scratch dir: {', '.join(map(str, leaked))}")
        return Isolation(mode=mode, isolated=mode == "bwrap" and all(fields.values()), memory_cap=memory_cap,
                         notes=list(notes), **fields)
    finally:
        listener.close()
        unix_listener.close()
        shutil.rmtree(outside_dir, ignore_errors=True)


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot): tells a process from a pid reuse."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _run_probe(box: Sandbox, program: str, limits: SandboxLimits, mode: str, group_seen: list) -> SandboxResult:
    """Run the probe (no guard: it is ours); records whether the sample's cgroup really charged it."""

    def observe(group: _Cgroup) -> None:
        group_seen.extend([group.charged(), group.kind])

    return box.execute({"main.py": program}, lambda files: [files + "/main.py"], limits=limits, mode=mode,
                       on_group=observe)


def _ipc_visible(key: int) -> bool:
    """True (and the objects removed) when SysV objects with `key` exist on the host."""
    libc = ctypes.CDLL(None, use_errno=True)
    found = False
    shm = libc.shmget(key, 0, 0)
    if shm >= 0:
        found = True
        libc.shmctl(shm, 0, None)  # IPC_RMID
    msg = libc.msgget(key, 0)
    if msg >= 0:
        found = True
        libc.msgctl(msg, 0, None)
    return found
