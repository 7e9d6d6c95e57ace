"""The code sandbox contains hostile programs (scored as failures, host unharmed) and runs honest ones; canonical
HumanEval/MBPP solutions pass and broken ones fail."""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

import pytest

from sarmerge.evaluate.benchmarks import LoadRequest, ScoreContext, get_suite, score_code
from sarmerge.evaluate.sandbox import UID_RANGE, Sandbox, SandboxLimits

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
FAST = SandboxLimits(cpu_seconds=2, wall_seconds=4, memory_bytes=512 << 20, nproc=16)


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(FAST)


@pytest.fixture(scope="module")
def full_isolation(box: Sandbox) -> None:
    if not (box.isolation.network_isolated and box.isolation.filesystem_isolated and box.isolation.uid_dropped):
        pytest.skip(f"namespaces unavailable here: {box.isolation}")


def sandbox_processes() -> list[int]:
    """Processes running under any sandbox uid (there must be none between runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if UID_RANGE[0] <= entry.stat().st_uid < UID_RANGE[1]:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


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


def test_this_machine_gets_full_isolation(box: Sandbox) -> None:
    # CI runs as root with util-linux: every layer must be on, and the summary says so
    iso = box.isolation
    if os.geteuid() != 0:
        pytest.skip("the full layering is asserted for root runs (CI)")
    assert iso.mode == "namespaces"
    assert iso.network_isolated and iso.filesystem_isolated and iso.pid_namespace
    assert iso.uid_dropped and iso.process_limit_enforced


def test_honest_program_passes_and_can_use_its_scratch_dir(box: Sandbox) -> None:
    program = ("import os\nopen('notes.txt', 'w').write('hi')\nassert open('notes.txt').read() == 'hi'\n"
               "assert os.getcwd() == os.environ['HOME']\nprint(sum(range(10)))\n")
    r = box.run(program)
    assert r.passed and r.status == "passed" and r.stdout.strip() == "45"


def test_failing_assert_is_a_failure(box: Sandbox) -> None:
    r = box.run("assert 1 + 1 == 3, 'wrong'")
    assert not r.passed and r.status == "failed" and "AssertionError: wrong" in r.reason


def test_environment_is_scrubbed(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARMERGE_TEST_SECRET", "hunter2")
    r = box.run("import os, sys\nassert 'SARMERGE_TEST_SECRET' not in os.environ, 'leaked'\n"
                "assert sys.flags.isolated\nprint(sorted(os.environ))")
    assert r.passed, r.stderr
    assert "hunter2" not in r.stdout


def test_infinite_loop_is_stopped_by_the_cpu_limit(box: Sandbox) -> None:
    # a generous wall limit: on a loaded machine one CPU second can take several wall seconds
    r = box.run("while True:\n    pass\n", limits=SandboxLimits(cpu_seconds=1, wall_seconds=30))
    assert not r.passed
    assert r.status == "failed" and "SIGXCPU" in r.reason
    assert not sandbox_processes()


def test_sleeping_program_is_stopped_by_the_wall_timeout(box: Sandbox) -> None:
    r = box.run("import time\ntime.sleep(60)\n", limits=SandboxLimits(wall_seconds=1.5))
    assert r.status == "timeout" and not r.passed
    assert r.seconds < 5
    assert not sandbox_processes()


def test_fork_bomb_is_contained_and_cleaned_up(box: Sandbox, full_isolation: None) -> None:
    before = own_descendants()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = box.run(bomb, limits=SandboxLimits(cpu_seconds=3, wall_seconds=2, nproc=12))
    assert not r.passed and r.status in ("timeout", "failed")
    assert not sandbox_processes(), "fork bomb processes survived"
    assert own_descendants() == before


def test_process_count_limit_holds(box: Sandbox, full_isolation: None) -> None:
    # forks sleeping children until the kernel refuses; the count of successes is bounded by nproc
    program = ("import os, time\nok = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
               "    ok += 1\nprint(ok)\n")
    r = box.run(program, limits=SandboxLimits(cpu_seconds=3, wall_seconds=10, nproc=8))
    assert r.passed, r.stderr
    assert 1 <= int(r.stdout.strip()) < 8  # the program itself is one of the 8
    assert not sandbox_processes(), "children outlived their program (pid namespace must take them down)"


def test_memory_hog_fails_with_memory_error(box: Sandbox) -> None:
    r = box.run("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n")
    assert not r.passed and "MemoryError" in r.reason


@pytest.mark.parametrize("where", ["world_writable_dir", "home"])
def test_write_outside_the_scratch_dir_fails_and_leaves_no_file(box: Sandbox, full_isolation: None,
                                                                tmp_path: Path, where: str) -> None:
    if where == "world_writable_dir":
        target_dir = tmp_path / "shared"
        target_dir.mkdir()
        os.chmod(target_dir, 0o1777)  # like /tmp: only the read-only mount can stop the write
    else:
        target_dir = Path(os.path.expanduser("~"))
    target = target_dir / f"sarmerge-sandbox-escape-{os.getpid()}.txt"
    r = box.run(f"open({str(target)!r}, 'w').write('pwned')\n")
    assert not r.passed and ("Read-only file system" in r.reason or "Permission denied" in r.reason)
    assert not target.exists()


def test_network_connection_fails_and_reaches_nobody(box: Sandbox, full_isolation: None) -> None:
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
        r = box.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
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


def test_os_system_is_refused_and_a_bypass_is_still_contained(box: Sandbox, full_isolation: None,
                                                              tmp_path: Path) -> None:
    target_dir = tmp_path / "shared"
    target_dir.mkdir()
    os.chmod(target_dir, 0o1777)
    marker = target_dir / "from-shell"
    r = box.run(f"import os\nos.system('touch {marker}')\n")
    assert not r.passed and "os.system is disabled" in r.reason
    # the guard is only defence in depth: a shell started through libc directly still cannot write outside
    bypass = box.run(f"import ctypes\nstatus = ctypes.CDLL(None).system(b'touch {marker}')\nprint(status)\n")
    assert bypass.passed and bypass.stdout.strip() != "0"
    assert not marker.exists()
    assert not box.run("import subprocess\nsubprocess.run(['true'])\n").passed


def test_output_is_bounded(box: Sandbox) -> None:
    r = box.run("import sys\nfor _ in range(100000):\n    sys.stdout.write('x' * 1000)\n",
                limits=SandboxLimits(file_size_bytes=1 << 20))
    assert not r.passed and ("File too large" in r.reason or "file size" in r.reason)
    assert len(r.stdout) < 10_000


def test_without_namespaces_the_gap_is_reported() -> None:
    # the fallback mode must say, not hide, that it has no network isolation (only probed: nothing hostile runs)
    iso = Sandbox(FAST, mode="rlimits").isolation
    assert iso.mode == "rlimits"
    assert iso.network_isolated is False
    assert iso.pid_namespace is False
    assert iso.process_limit_enforced == (os.geteuid() != 0)


# -- benchmark solutions ---------------------------------------------------------------------------------------------
def _humaneval(limit_ids: list[str] | None = None) -> list:
    items = get_suite("humaneval").load(LoadRequest())
    return items if limit_ids is None else [i for i in items if i.id in limit_ids]


def _score(items: list, completions: list[str], box: Sandbox) -> list:
    return score_code(items, completions, ScoreContext(sandbox_factory=lambda: box, workers=2))


def _subset(n: int) -> list:
    items = _humaneval()
    return sorted(random.Random(4).sample(items, n), key=lambda i: int(i.id.split("/")[1]))


def test_canonical_humaneval_solutions_pass_seeded_subset(box: Sandbox) -> None:
    items = _subset(24)
    verdicts = _score(items, [i.private["canonical_solution"] for i in items], box)
    assert [v.detail for v in verdicts if not v.correct] == []


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


@pytest.mark.slow
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
