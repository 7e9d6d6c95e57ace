"""Forged code verdicts and hostile scorer inputs (issue 11 items 1, 2, 4): every forgery below ships a WRONG
solution plus a trick, and must be scored FAILED; the reasoning-gym scorers that eval answers must run nothing on
the host. Runs in the strongest mode this machine makes (bwrap as root in CI; see the mode in the test ids' skip
reasons otherwise); forged verdicts are checked in the rlimits mode too, since the harness, not the mode, decides."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sarmerge.evaluate.benchmarks import LoadRequest, ScoreContext, get_suite, score_code
from sarmerge.evaluate.harness import CodeJob, run_code_job
from sarmerge.evaluate.sandbox import Sandbox, SandboxLimits

LIMITS = SandboxLimits(cpu_seconds=5, wall_seconds=20, memory_bytes=512 << 20)
SIGNATURE = "def has_close_elements(numbers, threshold):\n"
WRONG = "    return False\n"  # fails HumanEval/0's asserts that expect True
FORGED_REPORT = '{"nonce": "x", "passed": 1, "total": 1, "asserts": 7, "failures": []}'

FORGERIES = {
    "os_exit_at_import": "import os\nos._exit(0)\n" + SIGNATURE + WRONG,
    "os_exit_in_function": SIGNATURE + "    import os\n    os._exit(0)\n",
    "atexit_os_exit": "import atexit, os\natexit.register(lambda: os._exit(0))\n" + SIGNATURE + WRONG,
    "sys_exit_in_function": SIGNATURE + "    import sys\n    sys.exit(0)\n",
    "raise_systemexit_in_function": SIGNATURE + "    raise SystemExit(0)\n",
    "keyboard_interrupt": SIGNATURE + "    raise KeyboardInterrupt\n",
    "override_builtins": ("import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"
                          "builtins.AssertionError = type('Nope', (Exception,), {})\nbuiltins.len = lambda x: 0\n"
                          + SIGNATURE + WRONG),
    "always_equal": ("class AlwaysEqual:\n    def __eq__(self, other):\n        return True\n"
                     "    def __ne__(self, other):\n        return False\n"
                     "    def __bool__(self):\n        return True\n"
                     + SIGNATURE + "    return AlwaysEqual()\n"),
    "always_equal_bool_subclass": ("class Sneaky(int):\n    def __eq__(self, other):\n        return True\n"
                                   "    __hash__ = int.__hash__\n" + SIGNATURE + "    return Sneaky(1)\n"),
    "redefine_check": ("def check(candidate):\n    return True\nimport builtins\nbuiltins.check = check\n"
                       + SIGNATURE + WRONG),
    "print_fake_success": (f"print('passed 1/1 tests')\nprint({FORGED_REPORT!r})\nimport sys\n"
                           f"sys.stderr.write({FORGED_REPORT!r})\n" + SIGNATURE + WRONG),
    "write_every_fd": ("import os\nfor fd in range(0, 1024):\n    try:\n"
                       f"        os.write(fd, ({FORGED_REPORT!r} + '\\n').encode())\n    except OSError:\n"
                       "        pass\n" + SIGNATURE + WRONG),
    "close_every_fd": ("import os\nfor fd in range(0, 1024):\n    try:\n        os.close(fd)\n    except OSError:\n"
                       "        pass\n" + SIGNATURE + WRONG),
    "forge_reply_on_own_channel": ("import os, json\nfor fd in range(3, 64):\n    try:\n"
                                   "        os.write(fd, (json.dumps(['ok', ['b', True]]) + '\\n').encode() * 50)\n"
                                   "    except OSError:\n        pass\n" + SIGNATURE + WRONG),
    "kill_the_harness": SIGNATURE + "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_everything": SIGNATURE + "    import os, signal\n    os.kill(-1, signal.SIGKILL)\n",
    "write_through_proc_of_harness": (
        "import os\nppid = os.getppid()\nfor target in ['/proc/%d/fd/%d' % (ppid, n) for n in range(64)]:\n"
        "    try:\n        with open(target, 'w') as f:\n"
        f"            f.write({FORGED_REPORT!r} + '\\n')\n    except OSError:\n        pass\n"
        "try:\n    open('/proc/%d/mem' % ppid, 'r+b')\nexcept OSError:\n    pass\n" + SIGNATURE + WRONG),
    "settrace_tricks": ("import sys, threading\ndef tracer(frame, event, arg):\n"
                        "    frame.f_locals.clear()\n    return tracer\nsys.settrace(tracer)\n"
                        "threading.settrace(tracer)\nsys.setprofile(lambda *a: None)\n" + SIGNATURE + WRONG),
    "hang_in_function": SIGNATURE + "    import time\n    time.sleep(3600)\n",
    "huge_reply": SIGNATURE + "    return 'x' * (64 << 20)\n",
    "deep_reply": SIGNATURE + "    v = []\n    for _ in range(10000):\n        v = [v]\n    return v\n",
    "return_a_function": SIGNATURE + "    return lambda *a: True\n",
    "raise_assertion_error": SIGNATURE + "    raise AssertionError\n",
    "daemon_outlives": "import os, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\n" + SIGNATURE + WRONG,
}


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(LIMITS)


@pytest.fixture(scope="module")
def humaneval_0() -> object:
    return get_suite("humaneval").load(LoadRequest())[0]


def _verdict(box: Sandbox, item: object, completion: str, *, allow: bool = False) -> object:
    ctx = ScoreContext(sandbox_factory=lambda: box, workers=1, allow_unisolated=allow)
    return score_code([item], [completion], ctx)[0]


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_pass_is_scored_failed(box: Sandbox, humaneval_0: object, name: str) -> None:
    if not box.isolation.isolated:
        pytest.skip(f"no isolating sandbox here ({box.isolation.mode}): covered by the rlimits case below")
    v = _verdict(box, humaneval_0, FORGERIES[name])
    assert not v.correct, (name, v.detail)
    assert len(v.detail) <= 200


def test_the_same_trick_with_a_right_solution_still_passes(box: Sandbox, humaneval_0: object) -> None:
    # the positive control: a print, an atexit handler or a daemon are not punished, only wrong answers are
    right = humaneval_0.private["canonical_solution"]
    for prefix in ("print('hello')\n", "import atexit, os\natexit.register(lambda: os._exit(0))\n"):
        v = _verdict(box, humaneval_0, prefix + humaneval_0.completion_prompt + right, allow=True)
        assert v.correct, v.detail


@pytest.mark.parametrize("name", ["os_exit_at_import", "atexit_os_exit", "sys_exit_in_function", "always_equal",
                                  "print_fake_success", "write_every_fd", "kill_the_harness", "override_builtins"])
def test_forged_pass_is_scored_failed_in_rlimits_mode_too(humaneval_0: object, name: str) -> None:
    rl = Sandbox(LIMITS, mode="rlimits")
    v = _verdict(rl, humaneval_0, FORGERIES[name], allow=True)
    assert not v.correct, (name, v.detail)


def test_candidate_cannot_read_the_tests(box: Sandbox) -> None:
    # the trusted test code travels on the harness's stdin, never as a file the candidate could read and replay
    marker = f"SECRET-{secrets.token_hex(6)}"
    candidate = (
        "import os\n"
        "def leaked():\n"
        f"    needle = {marker[:7]!r} + {marker[7:]!r}\n"
        "    seen = []\n"
        "    paths = [os.path.join(d, n) for root in ('/sandbox', '/tmp') for d, _, ns in os.walk(root) for n in ns]\n"
        "    harness = '/proc/%d/' % os.getppid()\n"
        "    paths += [harness + n for n in ('cmdline', 'environ', 'mem', 'fd/0', 'fd/1', 'fd/3', 'fd/4')]\n"
        "    for path in paths:\n"
        "        try:\n"
        "            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)\n"
        "            try:\n"
        "                seen.append(needle.encode() in os.read(fd, 1 << 20))\n"
        "            finally:\n"
        "                os.close(fd)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return any(seen)\n")
    job = CodeJob(candidate, {"kind": "mbpp", "setup": "", "tests": [f"assert leaked() is False  # {marker}"]})
    v = run_code_job(box, job)
    assert v.passed, f"the candidate found the trusted test text: {v.detail}"


INIT_PROBE = """
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
def reached():
    got = []
    pidfd = libc.syscall(434, 1, 0)  # pidfd_open(1, 0): allowed (a pid is not a secret)
    for n in range(16):
        if pidfd >= 0 and libc.syscall(438, pidfd, n, 0) >= 0:  # pidfd_getfd: needs ptrace rights over pid 1
            got.append("pidfd_getfd %d" % n)
        try:
            os.close(os.open("/proc/1/fd/%d" % n, os.O_WRONLY | os.O_NONBLOCK))
            got.append("/proc/1/fd/%d" % n)
        except OSError:
            pass
    if libc.ptrace(16, 1, None, None) == 0:  # PTRACE_ATTACH
        got.append("ptrace")
    for path in ("/proc/1/mem", "/proc/1/environ"):
        try:
            os.close(os.open(path, os.O_RDONLY))
            got.append(path)
        except OSError:
            pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL):
        os.kill(1, sig)  # from inside its namespace: ignored by an init without handlers
    return got
"""
FORGE_THROUGH_INIT = (  # hostile review, 2026-12-02: bwrap's own init used to hold the host's stderr file and the
    # eventfd bwrap turns into its exit status; this wrote a fake setup error and chose the exit code
    "import ctypes, os, struct\nlibc = ctypes.CDLL(None, use_errno=True)\npidfd = libc.syscall(434, 1, 0)\n"
    "for n, data in ((2, b'sarmerge sandbox setup: EVIL-TEXT\\n'), (5, struct.pack('Q', 122))):\n"
    "    fd = libc.syscall(438, pidfd, n, 0)\n    if fd >= 0:\n        os.write(fd, data)\n"
    + SIGNATURE + WRONG)


def test_the_sandbox_init_is_out_of_reach(box: Sandbox, humaneval_0: object) -> None:
    """pid 1 of the sandbox is sarmerge's boot: not dumpable, no fds, no handlers, with the sample's limits."""
    if box.isolation.mode != "bwrap":
        pytest.skip(f"no pid namespace in mode {box.isolation.mode}")
    v = run_code_job(box, CodeJob(INIT_PROBE, {"kind": "mbpp", "setup": "", "tests": ["assert reached() == []"]}))
    assert v.passed, f"the candidate reached the sandbox's init: {v.detail}"
    forged = _verdict(box, humaneval_0, FORGE_THROUGH_INIT, allow=True)
    assert not forged.correct and "EVIL" not in forged.detail and "sandbox_error" not in forged.detail, forged.detail


def test_raises_style_tests_still_work(box: Sandbox) -> None:
    candidate = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tests = ["assert f(2) == 2",
             "try:\n    f(-1)\n    assert False\nexcept ValueError:\n    assert True"]
    assert run_code_job(box, CodeJob(candidate, {"kind": "mbpp", "setup": "", "tests": tests})).passed


def test_plain_data_round_trips(box: Sandbox) -> None:
    candidate = "def echo(x):\n    return x\n"
    values = ("None", "True", "-12345678901234567890", "1.5", "float('nan')", "float('-inf')", "'snow ☃'",
              "b'\\x00\\xff'", "[1, [2, (3,)]]", "{'a': {1, 2}, 2: frozenset({3})}", "complex(1, -2)")
    tests = [f"v = {v}\nr = echo(v)\nassert type(r) is type(v) and (r == v or (r != r and v != v))" for v in values]
    verdict = run_code_job(box, CodeJob(candidate, {"kind": "mbpp", "setup": "", "tests": tests}))
    assert verdict.passed, verdict.detail


def test_detail_never_carries_program_output_or_host_files(box: Sandbox, humaneval_0: object) -> None:
    secret_dir = Path(tempfile.mkdtemp(prefix="sarmerge-secret-"))
    os.chmod(secret_dir, 0o755)
    secret = secret_dir / "secret.txt"
    secret.write_text("TOPSECRET-" + secrets.token_hex(8))
    os.chmod(secret, 0o644)
    try:
        completion = (f"import sys\ntry:\n    data = open({str(secret)!r}).read()\nexcept OSError as e:\n"
                      "    data = 'TOPSECRET-unreadable'\nprint(data)\nsys.stderr.write(data)\n"
                      + SIGNATURE + "    raise ValueError(data)\n")
        v = _verdict(box, humaneval_0, completion, allow=True)
        assert not v.correct
        assert "TOPSECRET" not in v.detail and len(v.detail) <= 200
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


# -- item 1: reasoning-gym scorers that eval the answer -------------------------------------------------------------
@pytest.fixture
def marker_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sarmerge-pwned-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("task", ["string_insertion", "spiral_matrix", "countdown", "polynomial_multiplication"])
def test_hostile_reasoning_gym_answer_runs_nothing_on_the_host(task: str, marker_dir: Path) -> None:
    pytest.importorskip("reasoning_gym")
    box = Sandbox()
    suite = get_suite(f"reasoning_gym:{task}")
    items = suite.load(LoadRequest(seed=0, limit=2))
    marker = marker_dir / f"pwned-{task}"
    hostile = f"Answer: __import__('os').system('touch {marker}') or []"
    python_hostile = f"Answer: __import__('pathlib').Path({str(marker)!r}).write_text('x') or []"
    ctx = ScoreContext(sandbox_factory=lambda: box, workers=2, allow_unisolated=True)
    verdicts = suite.score(items, [hostile, python_hostile], ctx)
    assert not marker.exists(), "a model answer ran code on the host"
    assert not any(v.correct for v in verdicts)
    # the honest answer to the same item still scores, in its own process
    honest = suite.score(items[:1], [f"Answer: {items[0].answer}"], ctx)
    assert honest[0].correct, honest[0].detail


def test_reasoning_gym_answer_travels_as_data_not_code(marker_dir: Path) -> None:
    pytest.importorskip("reasoning_gym")
    from sarmerge.evaluate.harness import ScoreJob, run_reasoning_gym_job

    box = Sandbox()
    marker = marker_dir / "quoted"
    answer = f"\"); __import__('os').system('touch {marker}'); (\"" + json.dumps({"x": 1})
    result = run_reasoning_gym_job(box, ScoreJob("chain_sum", 0, 2, 0, answer))
    assert result.score in (0.0, None) and not marker.exists()


# -- item 1, verdicts: answers that would forge a reasoning-gym score from inside an executing scorer ---------------
def _rg_forgeries(marker: Path) -> dict[str, str]:
    """Each would run inside the scorer (every named scorer evals / sympifies its answer) and first try to touch
    `marker` (failing quietly where the sandbox keeps it out of reach, so the forgery itself still runs there)."""
    touch = f"__import__('os').system('touch {marker} 2>/dev/null')"
    report = ("import inspect, json, os\\nfor fi in inspect.stack():\\n    loc = fi.frame.f_locals\\n"
              "    if 'job' in loc and 'report' in loc:\\n"
              "        loc['report'].write(json.dumps({'nonce': loc['job']['nonce'], 'score': 1.0}) + '\\\\n')\\n"
              "        loc['report'].flush()\\n        os._exit(0)\\n")
    patch = ("import builtins, json\\njson.real_dumps = json.dumps\\njson.dumps = lambda o, *a, **k: "
             "__import__('json').real_dumps({**o, 'score': 1.0, 'error': None} if 'nonce' in o else o)\\n"
             "builtins.float = lambda *a: 1.0\\n")
    return {
        "fake_report": f'exec("{touch}\\n{report}") or []',
        "patch_json_and_float": f'exec("{touch}\\n{patch}") or []',
        "exit_0_early": f"[{touch}, __import__('os')._exit(0)]",
        "print_fake_score": f'[{touch}, print(\'{{"score": 1.0}}\')]',
        "data_then_code": f"[1, 2] + [{touch}]",
    }


@pytest.mark.parametrize("task", ["string_insertion", "spiral_matrix", "countdown", "polynomial_multiplication"])
def test_reasoning_gym_forgeries_are_wrong_and_never_reach_a_scorer(task: str, marker_dir: Path) -> None:
    pytest.importorskip("reasoning_gym")
    suite = get_suite(f"reasoning_gym:{task}")
    marker = marker_dir / f"forged-{task}"
    forgeries = _rg_forgeries(marker)
    items = suite.load(LoadRequest(seed=0, limit=len(forgeries)))

    def no_sandbox() -> Sandbox:
        raise AssertionError("a forgery was handed to a scorer")

    ctx = ScoreContext(sandbox_factory=no_sandbox, workers=2)
    verdicts = suite.score(items, [f"Answer: {text}" for text in forgeries.values()], ctx)
    for name, v in zip(forgeries, verdicts, strict=True):
        assert not v.correct and v.score == 0.0, name
        assert v.detail.startswith("answer rejected before scoring"), (name, v.detail)
    assert not marker.exists(), "a forgery ran on the host"


@pytest.mark.parametrize("task", ["string_insertion", "spiral_matrix", "countdown", "polynomial_multiplication"])
def test_reasoning_gym_gold_answers_still_score_through_the_grammar_and_sandbox(task: str) -> None:
    pytest.importorskip("reasoning_gym")
    suite = get_suite(f"reasoning_gym:{task}")
    items = suite.load(LoadRequest(seed=3, limit=20))
    box = Sandbox()
    ctx = ScoreContext(sandbox_factory=lambda: box, workers=2, allow_unisolated=True)
    verdicts = suite.score(items, [f"reasoning...\nAnswer: {it.answer}" for it in items], ctx)
    wrong = [(it.id, v.detail) for it, v in zip(items, verdicts, strict=True) if not v.correct]
    assert not wrong, wrong
    assert all(v.score == 1.0 for v in verdicts)
    # negative control on the same path: a well-formed wrong answer reaches the scorer and scores wrong
    wrong_answer = {"string_insertion": "ABAB", "spiral_matrix": "1 2 3", "countdown": "1 + 2",
                    "polynomial_multiplication": "x + 1"}[task]
    miss = suite.score(items[:1], [f"Answer: {wrong_answer}"], ctx)[0]
    assert not miss.correct and miss.detail.startswith("score "), miss.detail


@pytest.mark.parametrize("task", ["string_insertion", "spiral_matrix", "countdown", "polynomial_multiplication"])
def test_reasoning_gym_forgeries_are_live_threats_without_the_grammar(task: str, marker_dir: Path) -> None:
    """Control for the test above: handed straight to the sandboxed scorer, the forgeries do win a wrong item."""
    pytest.importorskip("reasoning_gym")
    import reasoning_gym

    from sarmerge.evaluate.harness import ScoreJob, pickle_entry, run_reasoning_gym_job

    box = Sandbox()
    entry = reasoning_gym.create_dataset(task, seed=0, size=2)[0]
    forgeries = _rg_forgeries(marker_dir / "raw")
    for name in ("fake_report", "patch_json_and_float"):
        job = ScoreJob(task, 0, 2, 0, forgeries[name], pickle_entry(entry), entry["question"])
        assert run_reasoning_gym_job(box, job).score == 1.0, name
    assert not (marker_dir / "raw").exists()  # even then, the sandbox kept it off the host
