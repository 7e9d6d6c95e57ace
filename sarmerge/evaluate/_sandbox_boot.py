"""First program inside a sandbox: lock the process down, then exec the untrusted program.

Run as `python -I -S _sandbox_boot.py CONFIG_JSON` (stdlib only, imports nothing from sarmerge). In namespace mode it
runs as root of fresh mount/pid/network namespaces, so it can make every mount read-only except the scratch dir and
show the Python installation at a path an unprivileged uid can reach, before it applies resource limits, drops to that
uid and execs. Exit codes 120-126 mean the sandbox itself failed
(not the program); a program killed by signal S exits 128+S.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_NOATIME, MS_NODIRATIME = 32, 4096, 1024, 2048
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
# Flags a remount must keep: in a user namespace dropping a "locked" one is refused with EPERM.
KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_NO_NEW_PRIVS = 38


def die(code: int, message: str) -> None:
    sys.stderr.write(f"sarmerge sandbox setup: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def unescape(path: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes
    return path.encode().decode("unicode_escape").encode("latin-1").decode()


def mount(libc: ctypes.CDLL, source: str | None, target: str, flags: int) -> int:
    src = source.encode() if source is not None else None
    if libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        return ctypes.get_errno()
    return 0


def lock_filesystem(work: str, python_src: str | None, python_dst: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if python_src and python_dst:
        err = mount(libc, python_src, python_dst, MS_BIND)
        if err:
            die(121, f"bind {python_src} -> {python_dst}: {os.strerror(err)}")
    # the scratch dir becomes its own mount so it stays writable when its parents turn read-only
    err = mount(libc, work, work, MS_BIND)
    if err:
        die(121, f"bind {work}: {os.strerror(err)}")
    with open("/proc/self/mountinfo") as f:
        entries = [line.split() for line in f]
    seen = set()
    for fields in entries:
        point = unescape(fields[4])
        if point == work or point in seen:
            continue
        seen.add(point)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= KEEP_FLAGS.get(opt, 0)
        err = mount(libc, None, point, flags)
        if err and point == "/":
            die(122, f"cannot make / read-only: {os.strerror(err)}")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    work = cfg["work"]
    if cfg["lock_fs"]:
        lock_filesystem(work, cfg.get("python_src"), cfg.get("python_dst"))
    pid = os.fork()
    if pid == 0:
        try:
            run_program(cfg)
        finally:
            os._exit(126)
    # Stay as the namespace's init (pid 1 ignores signals it has no handler for, so the program must not be pid 1):
    # reap orphans until the program ends, then leave, which kills whatever it left behind.
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            os._exit(126)
        if done == pid:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def run_program(cfg: dict) -> None:
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
    uid = cfg.get("uid")
    if uid is not None:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        except OSError as e:
            die(124, f"drop to uid {uid}: {e}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries cannot raise privileges again
    try:
        os.chdir(cfg["work"])
        os.execve(cfg["python"], [cfg["python"], "-I", "-B", cfg["program"]], cfg["env"])
    except OSError as e:
        die(125, f"exec {cfg['python']}: {e}")


if __name__ == "__main__":
    main()
