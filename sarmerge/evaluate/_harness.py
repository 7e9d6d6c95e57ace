"""In-sandbox test harness: the trusted process T and the candidate process C (stdlib only; no sarmerge imports).

    python -I -B _harness.py trusted PYTHON CANDIDATE_FILE    # T: stdin = nonce line + job JSON (trusted code)
    python -I -B _harness.py candidate CANDIDATE_FILE RFD WFD  # C: started by T only

T makes itself non-dumpable (C, same uid, can then neither ptrace it nor open /proc/T/fd or /proc/T/mem), reads the
trusted code from its stdin (so C cannot read the tests from a file), starts C with close_fds and C's own stdout/
stderr going to scratch files, binds the names the tests call to proxies that ship arguments to C and decode the
result with a strict data-only codec, runs every assert with its own pristine builtins, and writes the verdict to
the report fd the host gave it (SARMERGE_REPORT_FD), which C never holds. C's exit status means nothing: C dying,
exiting early or hanging makes the proxied call fail, hence the test.
"""

import ast
import base64
import builtins
import ctypes
import json
import math
import os
import select
import subprocess
import sys
import time

PR_SET_DUMPABLE = 4
MAX_MESSAGE = 16 << 20  # bytes of one encoded call or result
MAX_DEPTH = 64
MAX_NODES = 1_000_000
MAX_INT_DIGITS = 4000
CALL_TIMEOUT = 60.0  # seconds one proxied call may take (the host's wall limit normally ends a hang first)
# Exceptions C may raise "as themselves" in T (so `raises`-style tests still work); anything else is CandidateError.
FORWARDED_EXCEPTIONS = frozenset(
    name for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, Exception)
    and not issubclass(obj, (StopIteration, StopAsyncIteration, AssertionError)))


class CodecError(Exception):
    """A value that is not plain data, or is too deep/large."""


class CandidateError(Exception):
    """The candidate raised something that is not a plain builtin exception, or failed to answer."""


# -- codec: tagged JSON, data only --------------------------------------------------------------------------------
def encode(value, depth=0, budget=None):
    budget = budget if budget is not None else [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise CodecError("value too large or too deep")
    t = type(value)  # exact types only: subclasses (e.g. an __eq__ that is always True) are not data
    if value is None:
        return ["n"]
    if t is bool:
        return ["b", value]
    if t is int:
        text = int.__repr__(value)
        if len(text) > MAX_INT_DIGITS:
            raise CodecError("integer too large")
        return ["i", text]
    if t is float:
        return ["f", float.hex(value) if math.isfinite(value) else float.__repr__(value)]
    if t is complex:
        return ["c", float.hex(value.real) if math.isfinite(value.real) else repr(value.real),
                float.hex(value.imag) if math.isfinite(value.imag) else repr(value.imag)]
    if t is str:
        return ["s", str.__str__(value)]
    if t is bytes:
        return ["y", base64.b64encode(value).decode("ascii")]
    tags = {list: "l", tuple: "t", set: "S", frozenset: "F"}
    if t in tags:
        return [tags[t], [encode(v, depth + 1, budget) for v in t.__iter__(value)]]
    if t is dict:
        return ["d", [[encode(k, depth + 1, budget), encode(v, depth + 1, budget)] for k, v in dict.items(value)]]
    raise CodecError(f"a {t.__name__} is not plain data")


def _float(text):
    if text in ("nan", "inf", "-inf"):
        return float(text)
    return float.fromhex(text)


def decode(node, depth=0, budget=None):
    budget = budget if budget is not None else [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH or type(node) is not list or not node or type(node[0]) is not str:
        raise CodecError("malformed value")
    tag, args = node[0], node[1:]
    try:
        if tag == "n" and not args:
            return None
        if tag == "b" and type(args[0]) is bool:
            return args[0]
        if tag == "i" and type(args[0]) is str and len(args[0]) <= MAX_INT_DIGITS:
            return int(args[0])
        if tag == "f" and type(args[0]) is str:
            return _float(args[0])
        if tag == "c" and len(args) == 2:
            return complex(_float(args[0]), _float(args[1]))
        if tag == "s" and type(args[0]) is str:
            return args[0]
        if tag == "y" and type(args[0]) is str:
            return base64.b64decode(args[0], validate=True)
        kinds = {"l": list, "t": tuple, "S": set, "F": frozenset}
        if tag in kinds and type(args[0]) is list:
            return kinds[tag](decode(v, depth + 1, budget) for v in args[0])
        if tag == "d" and type(args[0]) is list:
            out = {}
            for pair in args[0]:
                if type(pair) is not list or len(pair) != 2:
                    raise CodecError("malformed dict entry")
                out[decode(pair[0], depth + 1, budget)] = decode(pair[1], depth + 1, budget)
            return out
    except (IndexError, ValueError, TypeError) as e:
        raise CodecError(f"malformed {tag!r} value: {type(e).__name__}") from None
    raise CodecError(f"unknown tag {tag!r}")


# -- process C ----------------------------------------------------------------------------------------------------
def candidate_main(path, rfd, wfd):
    inbox = os.fdopen(rfd, "rb")
    outbox = os.fdopen(wfd, "wb")
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    load_error = None
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "candidate.py", "exec"), namespace)
    except BaseException as e:
        load_error = type(e).__name__
    for line in inbox:
        try:
            name, args, kwargs = json.loads(line)
            if load_error is not None:
                raise CandidateError(f"candidate did not load ({load_error})")
            fn = namespace.get(name)
            if not callable(fn):
                raise CandidateError(f"candidate defines no callable {name!r}")
            result = fn(*decode(args), **decode(kwargs))
            reply = ["ok", encode(result)]
        except BaseException as e:
            reply = ["err", type(e).__name__ if type(e).__name__ in FORWARDED_EXCEPTIONS else "CandidateError"]
        try:
            data = json.dumps(reply).encode()
        except (TypeError, ValueError, RecursionError):
            data = json.dumps(["err", "CandidateError"]).encode()
        outbox.write(data + b"\n")
        outbox.flush()


# -- process T ----------------------------------------------------------------------------------------------------
class Channel:
    """T's end of C's pipe pair: one JSON line per call, bounded in size and time."""

    def __init__(self, proc, to_c, from_c):
        self.proc, self.to_c, self.from_c = proc, to_c, from_c
        self.buffer = b""
        self.dead = False

    def call(self, name, args, kwargs):
        if self.dead:
            raise CandidateError("candidate process is gone")
        try:
            request = json.dumps([name, encode(list(args)), encode(dict(kwargs))]).encode() + b"\n"
        except CodecError as e:
            raise CandidateError(f"arguments are not plain data: {e}") from None
        try:
            self._write_all(request)
        except OSError:
            self.dead = True
            raise CandidateError("candidate process is gone") from None
        line = self._read_line()
        try:
            reply = json.loads(line)
            if type(reply) is not list or len(reply) != 2 or reply[0] not in ("ok", "err"):
                raise CodecError("malformed reply")
            value = decode(reply[1]) if reply[0] == "ok" else None
        except (ValueError, RecursionError, CodecError) as e:
            raise CandidateError(f"unreadable reply ({type(e).__name__})") from None
        if reply[0] == "ok":
            return value
        if type(reply[1]) is str and reply[1] in FORWARDED_EXCEPTIONS:
            raise getattr(builtins, reply[1])("raised by the candidate")
        raise CandidateError("the candidate raised an error")

    def _write_all(self, data):
        view = memoryview(data)
        while view:
            n = os.write(self.to_c, view)
            view = view[n:]

    def _read_line(self):
        deadline = time.monotonic() + CALL_TIMEOUT
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.dead = True
                raise CandidateError("candidate did not answer in time")
            ready, _, _ = select.select([self.from_c], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.from_c, 1 << 16)
            if not chunk:
                self.dead = True
                raise CandidateError("candidate process ended")
            self.buffer += chunk
            if len(self.buffer) > MAX_MESSAGE:
                self.dead = True
                raise CandidateError("candidate reply too large")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


class Proxy:
    """Stands for the candidate's callable `name` in the trusted namespace."""

    def __init__(self, channel, name):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)


class CountAsserts(ast.NodeTransformer):
    """After every assert statement, count it: the report says how many asserts ran and passed."""

    def visit_Assert(self, node):
        tick = ast.Expr(ast.Call(ast.Name("__sarmerge_assert_passed__", ast.Load()), [], []))
        return [node, ast.copy_location(tick, node)]


def compile_trusted(source, name):
    tree = CountAsserts().visit(ast.parse(source, name))
    return compile(ast.fix_missing_locations(tree), name, "exec")


def free_names(source):
    """Names the trusted code reads but never binds (and are not builtins): the candidate must provide them."""
    tree = ast.parse(source)
    loaded, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded.append(node.id) if isinstance(node.ctx, ast.Load) else bound.add(node.id))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    seen = []
    for name in loaded:
        if name not in bound and not hasattr(builtins, name) and name not in seen:
            seen.append(name)
    return seen


def trusted_main(python, candidate_path):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.exit(3)
    report = os.fdopen(int(os.environ.pop("SARMERGE_REPORT_FD")), "w")
    nonce = sys.stdin.readline().strip()
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    c_in_r, c_in_w = os.pipe()
    c_out_r, c_out_w = os.pipe()
    with open("candidate.stdout", "wb") as out, open("candidate.stderr", "wb") as err:
        proc = subprocess.Popen([python, "-I", "-B", os.path.abspath(__file__), "candidate", candidate_path,
                                 str(c_in_r), str(c_out_w)], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                close_fds=True, pass_fds=(c_in_r, c_out_w))
    os.close(c_in_r)
    os.close(c_out_w)
    channel = Channel(proc, c_in_w, c_out_r)
    passed, failures, total = 0, [], 0
    counter = [0]

    def tick():
        counter[0] += 1

    pristine = dict(vars(builtins))  # T's own builtins: C is another process and cannot touch them
    namespace = {"__name__": "__sarmerge_tests__", "__builtins__": pristine, "__sarmerge_assert_passed__": tick}
    try:
        if job["kind"] == "humaneval":
            exec(compile(job["prompt"], "prompt.py", "exec"), namespace)
            namespace[job["entry_point"]] = Proxy(channel, job["entry_point"])
            exec(compile_trusted(job["test"], "test.py"), namespace)
            total = 1
            try:
                namespace["check"](namespace[job["entry_point"]])
                if counter[0] < 1:
                    raise AssertionError("the test ran no assert")
                passed = 1
            except Exception as e:
                failures.append(type(e).__name__)
        elif job["kind"] == "mbpp":
            setup = job.get("setup") or ""
            for name in free_names(setup + "\n" + "\n".join(job["tests"])):
                namespace[name] = Proxy(channel, name)
            exec(compile(setup, "setup.py", "exec"), namespace)
            total = len(job["tests"])
            for test in job["tests"]:
                before = counter[0]
                try:
                    exec(compile_trusted(test, "test.py"), namespace)
                    if counter[0] == before:
                        raise AssertionError("the test ran no assert")
                    passed += 1
                except Exception as e:
                    failures.append(type(e).__name__)
        else:
            raise ValueError(f"unknown job kind {job['kind']!r}")
    finally:
        with_kill(proc)
    report.write(json.dumps({"nonce": nonce, "passed": passed, "total": total, "asserts": counter[0],
                             "failures": failures[:8]}) + "\n")
    report.flush()
    report.close()


def with_kill(proc):
    try:
        proc.kill()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "trusted":
        trusted_main(sys.argv[2], sys.argv[3])
    elif role == "candidate":
        candidate_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(2)
