"""The code sandbox contains hostile programs (scored as failures, host unharmed) and runs honest ones; canonical
HumanEval/MBPP solutions pass under the two-process harness and broken ones fail.

Modes exercised here: the strongest this machine makes (`bwrap`; as root in CI) and the forced `rlimits` mode;
the non-root mode runs in tests/test_evaluate_hostile_nonroot.py. Each test names the mode it needs."""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sarmerge.errors import SarmergeError
from sarmerge.evaluate.benchmarks import LoadRequest, ScoreContext, get_suite, score_code
from sarmerge.evaluate.sandbox import Sandbox, SandboxLimits

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
FAST = SandboxLimits(cpu_seconds=4, wall_seconds=20, memory_bytes=512 << 20, nproc=16)


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(FAST)


@pytest.fixture(scope="module")
def isolated(box: Sandbox) -> Sandbox:
    if not box.isolation.isolated:
        pytest.skip(f"this machine cannot make an isolating sandbox: {box.isolation}")
    return box


def own_descendants() -> list[int]:
    """Live (non-zombie) descendants of this test process."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-writable dir like /tmp (pytest's tmp_path parents are 0700: a sandbox uid could not reach it anyway)."""
    d = Path(tempfile.mkdtemp(prefix="sarmerge-test-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_this_machine_gets_full_isolation(box: Sandbox) -> None:
    # CI runs as root with bubblewrap: every layer must be on, probed, and the summary says so
    iso = box.isolation
    if os.geteuid() != 0:
        pytest.skip("the full layering is asserted for root runs (CI); non-root: test_evaluate_hostile_nonroot.py")
    assert iso.mode == "bwrap", iso
    assert iso.isolated, iso
    assert iso.memory_cap in ("cgroup-v1", "cgroup-v2"), iso


def test_honest_program_passes_and_can_use_its_scratch_dir(box: Sandbox) -> None:
    program = ("import os\nopen('notes.txt', 'w').write('hi')\nassert open('notes.txt').read() == 'hi'\n"
               "assert os.getcwd() == os.environ['HOME']\nprint(sum(range(10)))\n")
    r = box.run(program)
    assert r.passed and r.status == "passed" and r.stdout.strip() == "45", r


def test_failing_assert_is_a_failure(box: Sandbox) -> None:
    r = box.run("assert 1 + 1 == 3, 'wrong'")
    assert not r.passed and r.status == "failed" and "AssertionError: wrong" in r.reason


def test_environment_is_scrubbed(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARMERGE_TEST_SECRET", "hunter2")
    r = box.run("import os, sys\nassert 'SARMERGE_TEST_SECRET' not in os.environ, 'leaked'\n"
                "assert sys.flags.isolated\nprint(sorted(os.environ))")
    assert r.passed, r.stderr
    assert "hunter2" not in r.stdout


def test_caller_environment_is_unreadable_through_proc(isolated: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARMERGE_TEST_SECRET", "hunter2")
    r = isolated.run(f"import os\nprint(os.path.exists('/proc/{os.getpid()}'))\n"
                     f"open('/proc/{os.getpid()}/environ', 'rb').read()\n")
    assert not r.passed and "hunter2" not in r.stdout + r.stderr
    assert r.stdout.strip() == "False"


def test_infinite_loop_is_stopped_by_the_cpu_limit(box: Sandbox) -> None:
    # a generous wall limit: on a loaded machine one CPU second can take several wall seconds
    before = own_descendants()
    r = box.run("while True:\n    pass\n", limits=SandboxLimits(cpu_seconds=1, wall_seconds=30))
    assert not r.passed
    assert r.status == "failed" and "SIGXCPU" in r.reason
    assert own_descendants() == before


def test_sleeping_program_is_stopped_by_the_wall_timeout(box: Sandbox) -> None:
    before = own_descendants()
    r = box.run("import time\ntime.sleep(60)\n", limits=SandboxLimits(wall_seconds=3))
    assert r.status == "timeout" and not r.passed
    assert own_descendants() == before


def test_fork_bomb_is_contained_and_cleaned_up(isolated: Sandbox) -> None:
    before = own_descendants()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = isolated.run(bomb, limits=SandboxLimits(cpu_seconds=3, wall_seconds=3, nproc=12))
    assert not r.passed and r.status in ("timeout", "failed")
    assert own_descendants() == before, "fork bomb processes survived"


def test_process_count_limit_holds(isolated: Sandbox) -> None:
    # forks sleeping children until the kernel refuses; the count of successes is bounded by the process cap
    program = ("import os, time\nok = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
               "    ok += 1\nprint(ok)\n")
    before = own_descendants()
    r = isolated.run(program, limits=SandboxLimits(cpu_seconds=3, wall_seconds=20, nproc=8))
    assert r.passed, r.stderr
    assert 1 <= int(r.stdout.strip()) < 16
    assert own_descendants() == before, "children outlived their program (pid namespace must take them down)"


def test_memory_hog_fails(box: Sandbox) -> None:
    r = box.run("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n")
    assert not r.passed and ("MemoryError" in r.reason or "memory" in r.reason)


def test_memory_is_capped_for_the_whole_sample_not_per_process(isolated: Sandbox) -> None:
    # 6 children x 200 MiB under a 256 MiB cap: each fits its own address-space limit, together they must not
    if isolated.isolation.memory_cap == "rlimit-per-process":
        pytest.skip("no writable cgroup here: memory is capped per process only (reported as such)")
    program = ("import os, time\nkids = []\nfor _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
               "        b = bytearray(200 << 20)\n        for i in range(0, len(b), 4096):\n            b[i] = 1\n"
               "        time.sleep(2)\n        os._exit(0)\n    kids.append(pid)\n"
               "print(sum(os.waitpid(k, 0)[1] == 0 for k in kids))\n")
    r = isolated.run(program, limits=SandboxLimits(cpu_seconds=10, wall_seconds=60, memory_bytes=256 << 20))
    assert r.passed, r
    assert int(r.stdout.strip()) <= 1, "children held more than the aggregate cap"


def test_scratch_disk_is_capped_for_the_whole_sample_not_per_file(isolated: Sandbox) -> None:
    # many files each below the per-file cap: the size-limited tmpfs must say ENOSPC near its size
    program = ("import errno\nwritten = 0\ntry:\n    for i in range(64):\n        with open(f'f{i}', 'wb') as f:\n"
               "            f.write(b'x' * (1 << 20))\n        written += 1 << 20\nexcept OSError as e:\n"
               "    print('ENOSPC' if e.errno == errno.ENOSPC else e)\nprint(written)\n")
    r = isolated.run(program, limits=SandboxLimits(wall_seconds=30, scratch_bytes=8 << 20, file_size_bytes=2 << 20))
    assert r.passed, r
    lines = r.stdout.split()
    assert lines[0] == "ENOSPC" and int(lines[1]) <= 8 << 20


@pytest.mark.parametrize("where", ["world_writable_dir", "home", "site_packages"])
def test_write_outside_the_scratch_dir_fails_and_leaves_no_file(isolated: Sandbox, shared: Path,
                                                                where: str) -> None:
    import site

    name = f"sarmerge-sandbox-escape-{secrets.token_hex(4)}"
    target_dir = {"world_writable_dir": lambda: shared, "home": lambda: Path.home(),
                  "site_packages": lambda: Path(site.getsitepackages()[0])}[where]()
    target = target_dir / (name + (".pth" if where == "site_packages" else ".txt"))
    try:
        r = isolated.run(f"open({str(target)!r}, 'w').write('import os')\n")
        assert not r.passed
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_mounts_cannot_be_undone(isolated: Sandbox) -> None:
    program = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print(libc.mount(None, b'/', None, ctypes.c_ulong(32 | 4096), None), ctypes.get_errno())\n"
               "print(libc.umount2(b'/proc', 2), ctypes.get_errno())\n"
               "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])\n"
               "print(os.getuid())\n")
    r = isolated.run(program)
    assert r.passed, r
    remount, umount, cap_eff, uid = r.stdout.splitlines()
    assert remount.split()[0] == "-1" and umount.split()[0] == "-1"
    assert int(cap_eff, 16) == 0 and int(uid) != 0


def test_program_is_unprivileged_on_the_host_too(isolated: Sandbox) -> None:
    # a root-run bwrap would leave the program host uid 0 (global /proc/sys writable, RLIMIT_NPROC skipped)
    marker = f"sarmerge-uid-probe-{secrets.token_hex(4)}"
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not seen:
            for entry in Path("/proc").iterdir():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
                    # the program itself (the root stage and bwrap carry the marker in their arguments too)
                    if len(argv) >= 3 and argv[-2:] == [marker.encode(), b""] and argv[-3].endswith(b"/sandbox/p.py"):
                        seen.append(entry.stat().st_uid)
                except OSError:
                    continue

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        r = isolated.execute({"p.py": "import time\ntime.sleep(4)\n"}, lambda files: [files + "/p.py", marker])
    finally:
        stop.set()
        thread.join()
    assert r.passed, r
    assert seen and seen[0] != 0, f"host uid of the sandboxed program: {seen}"
    r = isolated.run("open('/proc/sys/kernel/hostname', 'w').write(open('/proc/sys/kernel/hostname').read())")
    assert not r.passed and "Permission denied" in r.reason


def test_network_connection_fails_and_reaches_nobody(isolated: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        r = isolated.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                         "s.sendall(b'exfiltrate')\n")
        # the server itself is reachable from the host, so a miss is the sandbox's doing
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        stop.set()
        thread.join()
        server.close()
    assert not r.passed and ("ConnectionRefused" in r.reason or "unreachable" in r.reason.lower()
                             or "OSError" in r.reason)
    assert len(accepted) == 1  # only the host's own check connected


def test_host_unix_socket_is_unreachable(isolated: Sandbox, shared: Path) -> None:
    # connect() ignores read-only mounts: only not seeing the path protects a host socket (docker.sock, postgres)
    path = shared / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o777)
    server.listen(4)
    server.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        r = isolated.run(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\n"
                         "s.sendall(b'exfiltrate')\n")
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))  # reachable from the host
        probe.close()
    finally:
        stop.set()
        thread.join()
        server.close()
    assert not r.passed and ("FileNotFoundError" in r.reason or "Permission" in r.reason), r.reason
    assert len(accepted) == 1


def test_sysv_ipc_does_not_cross_samples_or_reach_the_host(isolated: Sandbox) -> None:
    key = secrets.randbelow(1 << 30) + 1
    make = (f"import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget({key}, 4096, 0o1600) >= 0,"
            f" libc.msgget({key}, 0o1600) >= 0)\n")
    look = f"import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget({key}, 0, 0), libc.msgget({key}, 0))\n"
    first = isolated.run(make)
    second = isolated.run(look)
    assert first.stdout.split() == ["True", "True"], first
    assert second.stdout.split() == ["-1", "-1"], "a SysV object of one sample was visible in the next"
    libc = ctypes.CDLL(None)
    assert libc.shmget(key, 0, 0) == -1 and libc.msgget(key, 0) == -1, "the sample's IPC objects reached the host"


def test_os_system_is_refused_and_a_bypass_is_still_contained(isolated: Sandbox, shared: Path) -> None:
    marker = shared / "from-shell"
    r = isolated.run(f"import os\nos.system('touch {marker}')\n")
    assert not r.passed and "os.system is disabled" in r.reason
    # the guard is only defence in depth: a shell started through libc directly still cannot write outside
    bypass = isolated.run(f"import ctypes\nstatus = ctypes.CDLL(None).system(b'touch {marker}')\nprint(status)\n")
    assert bypass.passed and bypass.stdout.strip() != "0"
    assert not marker.exists()
    assert not isolated.run("import subprocess\nsubprocess.run(['true'])\n").passed


def test_output_is_bounded(box: Sandbox) -> None:
    r = box.run("import sys\nfor _ in range(100000):\n    sys.stdout.write('x' * 1000)\n",
                limits=SandboxLimits(file_size_bytes=1 << 20))
    assert not r.passed and ("File too large" in r.reason or "file size" in r.reason)
    assert len(r.stdout) < 10_000


# -- the rlimits mode: reported honestly, refused unless allowed ------------------------------------------------
def test_without_namespaces_the_gaps_are_probed_and_reported() -> None:
    iso = Sandbox(FAST, mode="rlimits").isolation
    assert iso.mode == "rlimits" and iso.isolated is False
    assert iso.network_isolated is False and iso.pid_namespace is False and iso.ipc_namespace is False
    assert iso.host_sockets_blocked is False and iso.filesystem_isolated is False
    assert iso.uid_unprivileged == (os.geteuid() != 0)


def test_rlimits_mode_refuses_code_suites_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARMERGE_SANDBOX_MODE", "rlimits")
    forced = Sandbox(FAST)
    assert forced.isolation.mode == "rlimits"
    items = get_suite("humaneval").load(LoadRequest())[:1]
    canonical = [items[0].private["canonical_solution"]]
    with pytest.raises(SarmergeError, match=r"refusing to run code suites.*allow_unisolated"):
        score_code(items, canonical, ScoreContext(sandbox_factory=lambda: forced))
    allowed = score_code(items, canonical, ScoreContext(sandbox_factory=lambda: forced, allow_unisolated=True))
    assert allowed[0].correct, allowed[0].detail


def test_an_unknown_forced_mode_is_a_clear_error() -> None:
    with pytest.raises(SarmergeError, match="sandbox mode 'docker'"):
        Sandbox(FAST, mode="docker")


# -- benchmark solutions ---------------------------------------------------------------------------------------------
def _humaneval(limit_ids: list[str] | None = None) -> list:
    items = get_suite("humaneval").load(LoadRequest())
    return items if limit_ids is None else [i for i in items if i.id in limit_ids]


def _score(items: list, completions: list[str], box: Sandbox) -> list:
    return score_code(items, completions, ScoreContext(sandbox_factory=lambda: box, workers=2,
                                                       allow_unisolated=True))


def _subset(n: int, seed: int = 4) -> list:
    items = _humaneval()
    return sorted(random.Random(seed).sample(items, n), key=lambda i: int(i.id.split("/")[1]))


def test_canonical_humaneval_solutions_pass_seeded_subset_of_40(box: Sandbox) -> None:
    # CI runs a seeded 40; the whole 164 run with SARMERGE_FULL_HUMANEVAL=1 (test below)
    items = _subset(40)
    verdicts = _score(items, [i.private["canonical_solution"] for i in items], box)
    assert [(i.id, v.detail) for i, v in zip(items, verdicts, strict=True) if not v.correct] == []
    assert all(v.detail.startswith("passed 1/1 tests") for v in verdicts)


def test_canonical_solutions_pass_as_chat_replies_too(box: Sandbox) -> None:
    items = _subset(6)
    replies = [f"Sure!\n```python\n{i.completion_prompt}{i.private['canonical_solution']}```\nHope it helps."
               for i in items]
    assert all(v.correct for v in _score(items, replies, box))


def test_broken_humaneval_solutions_fail(box: Sandbox) -> None:
    items = _subset(12)
    broken = ["    return None\n", "    pass\n", "    raise NotImplementedError\n", "this is not python\n"]
    completions = [broken[k % len(broken)] for k in range(len(items))]
    verdicts = _score(items, completions, box)
    assert not any(v.correct for v in verdicts), [i.id for i, v in zip(items, verdicts, strict=True) if v.correct]


@pytest.mark.skipif(os.environ.get("SARMERGE_FULL_HUMANEVAL") != "1", reason="set SARMERGE_FULL_HUMANEVAL=1")
def test_all_164_canonical_humaneval_solutions_pass(box: Sandbox) -> None:
    items = _humaneval()
    verdicts = _score(items, [i.private["canonical_solution"] for i in items], box)
    assert sum(v.correct for v in verdicts) == 164, [i.id for i, v in zip(items, verdicts, strict=True)
                                                     if not v.correct]


def test_mbpp_fixture_solutions_pass_and_wrong_ones_fail(box: Sandbox) -> None:
    items = (get_suite("mbpp").load(LoadRequest(data=FIXTURES / "mbpp.jsonl"))
             + get_suite("mbpp").load(LoadRequest(data=FIXTURES / "mbpp_sanitized.json")))
    good = _score(items, [f"```python\n{i.private['canonical_solution']}\n```" for i in items], box)
    assert all(v.correct for v in good), [v.detail for v in good]
    wrong = _score(items, ["```python\ndef larger(a, b):\n    return a\n```"] * len(items), box)
    assert not any(v.correct for v in wrong)


def test_a_venv_under_tmp_stays_visible_beside_the_scratch_tmpfs(box: Sandbox, shared: Path) -> None:
    """Sandboxed scorers run the venv's interpreter; a checkout under /tmp (CI's) must not be hidden by the scratch
    tmpfs mounted at /tmp inside the sandbox (bwrap mounts in order: the tmpfs first, the binds on top)."""
    import subprocess
    import sys

    if box.isolation.mode != "bwrap":
        pytest.skip(f"bwrap mode only (this machine: {box.isolation.mode})")
    venv = shared / "venv"
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / "marker.txt").write_text("visible")
    os.chmod(shared, 0o755)
    moved = Sandbox(box.limits)
    moved._venv, moved._venv_python = venv, str(venv / "bin" / "python")
    res = moved.execute({"main.py": "import sys\nprint(sys.prefix, open(sys.prefix + '/marker.txt').read())\n"},
                        lambda files: [files + "/main.py"], venv=True)
    assert res.passed, res.reason + res.stderr[-500:]
    assert res.stdout.split() == [str(venv), "visible"]
