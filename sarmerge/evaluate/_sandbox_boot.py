"""First program inside a sandbox: apply the resource limits, forbid privilege gains, then exec the real program.

Run as `python -I -S -B _sandbox_boot.py CONFIG_JSON` (stdlib only, imports nothing from sarmerge). The namespaces,
mounts and uid come from bubblewrap (or nothing, in rlimits mode); this process only adds what bwrap does not:
rlimits and no_new_privs. Exit codes 120-126 mean the sandbox itself failed (not the program); the program's own
exit status passes through (exec keeps the pid).
"""

import ctypes
import json
import os
import resource
import sys

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
    try:
        os.chdir(cfg["cwd"])
        os.execve(cfg["python"], cfg["argv"], cfg["env"])
    except OSError as e:
        die(125, f"exec {cfg['python']}: {e}")


if __name__ == "__main__":
    main()
