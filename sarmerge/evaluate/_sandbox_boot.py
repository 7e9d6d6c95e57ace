"""First program inside a sandbox: apply the resource limits, forbid privilege gains, then exec the real program.

Run as `python -I -S -B _sandbox_boot.py CONFIG_JSON` (stdlib only, imports nothing from sarmerge). The namespaces,
mounts and uid come from bubblewrap (or nothing, in rlimits mode); this process only adds what bwrap does not:
rlimits and no_new_privs. Exit codes 120-126 mean the sandbox itself failed (not the program); the program's own
exit status passes through (exec keeps the pid; as pid 1, 128 + N for a program killed by signal N).

Under bwrap (`--as-pid-1`) this process is the pid namespace's init: it forks the program and stays behind as a
reaper that is not dumpable and holds no file descriptors. bwrap's own init would be a dumpable process of the
program's uid holding the host's stdout/stderr files and bwrap's status eventfd: a program could ptrace it or take
those fds (pidfd_getfd, /proc/1/fd) to grow host files past RLIMIT_FSIZE or forge the sandbox's exit status.
"""

import ctypes
import json
import os
import resource
import signal
import sys

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38


def die(code: int, message: str) -> None:
    sys.stderr.write(f"sarmerge sandbox setup: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    limits = cfg["limits"]
    try:
        cpu = limits["cpu_seconds"]
        # soft limit sends SIGXCPU, the hard one a second later SIGKILL
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"],) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        die(123, f"setrlimit: {e}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # setuid binaries cannot raise privileges again
        die(124, f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    if cfg.get("init"):
        # not dumpable before the fork, so there is no moment when the program runs beside a dumpable init (the
        # child's execve makes it dumpable again, as any exec does)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            die(124, f"prctl(DUMPABLE): {os.strerror(ctypes.get_errno())}")
        try:
            child = os.fork()
        except OSError as e:
            die(126, f"fork: {e}")
        if child:
            reap(child)
    try:
        os.chdir(cfg["cwd"])
        os.execve(cfg["python"], cfg["argv"], cfg["env"])
    except OSError as e:
        die(125, f"exec {cfg['python']}: {e}")


def reap(child: int) -> None:
    """pid 1's loop: hold nothing, wait for every process, exit with the program's status when it ends (the kernel
    then kills whatever it left behind in the namespace)."""
    # Python's own SIGINT handler would let the program end pid 1 early; with default dispositions pid 1 ignores
    # every signal sent from inside its namespace
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(126)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
