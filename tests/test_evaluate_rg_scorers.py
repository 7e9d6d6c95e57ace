"""The reasoning-gym scorer audit (sarmerge.evaluate.rg_audit): recomputed against the installed reasoning-gym, shown
able to find what it looks for, confirmed dynamically (a code answer really runs in the named scorers and forges
its score on the raw sandbox path), and the host-side answer grammars that keep such answers away from them."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("reasoning_gym")

import reasoning_gym
import sympy
from reasoning_gym.dataset import ProceduralDataset

from sarmerge.errors import SarmergeError
from sarmerge.evaluate import rg_audit
from sarmerge.evaluate.benchmarks import ALLOW_EXECUTING_SCORERS_ENV, reasoning_gym_suite
from sarmerge.evaluate.harness import ScoreJob, pickle_entry, run_reasoning_gym_job
from sarmerge.evaluate.sandbox import Sandbox

NAMED = ["string_insertion", "spiral_matrix", "countdown", "polynomial_multiplication"]

# Python run by exec() inside the scorer: finds the scorer's own frame and reports score 1.0 under its nonce
FORGE_REPORT = (
    'exec("import inspect, json, os\\nfor fi in inspect.stack():\\n    loc = fi.frame.f_locals\\n'
    "    if 'job' in loc and 'report' in loc:\\n"
    "        loc['report'].write(json.dumps({'nonce': loc['job']['nonce'], 'score': 1.0}) + '\\\\n')\\n"
    "        loc['report'].flush()\\n        os._exit(0)\\n\") or []")


# -- the audit itself ---------------------------------------------------------------------------------------------
def test_frozen_audit_matches_the_installed_reasoning_gym() -> None:
    assert rg_audit.installed_version() == rg_audit.AUDITED_VERSION, (
        "reasoning-gym was upgraded: re-run `python -m sarmerge.evaluate.rg_audit`, review, and refreeze the data")
    live = {task: frozenset(a.sinks | {f"unresolved:{u}" for u in a.unresolved})
            for task, a in rg_audit.audit_scorers().items() if a.executes}
    assert live == rg_audit.EXECUTING_SCORERS
    assert set(NAMED) <= set(live)
    # every flagged task either has an answer grammar or is refused (composite: dynamic dispatch, no grammar)
    assert set(live) - set(rg_audit.ANSWER_GRAMMARS) == {"composite"}


def _planted(cls_name: str, score_answer: object, **extra: object) -> type:
    """A dataset class that looks like reasoning-gym's own to the audit (module name), scoring with `score_answer`."""
    body = {"score_answer": score_answer, "__module__": "reasoning_gym._planted", **extra}
    for value in body.values():
        if callable(value):
            value.__module__ = "reasoning_gym._planted"
    return type(cls_name, (ProceduralDataset,), body)


def _helper_that_evals(text: str) -> object:
    return eval(text)  # the audit must find this


def _audit_class(cls: type) -> rg_audit.ScorerAudit:
    audit = rg_audit.ScorerAudit(cls.__name__)
    rg_audit._Walker(audit).visit_object(cls.score_answer, cls)
    return audit


def test_audit_finds_sinks_reached_through_helpers_attributes_and_modules() -> None:
    _helper_that_evals.__module__ = "reasoning_gym._planted"

    def via_helper(self: object, answer: str, entry: dict) -> float:
        return float(_helper_that_evals(answer) == entry["answer"])

    def via_module(self: object, answer: str, entry: dict) -> float:
        return float(sympy.sympify(answer) == 1)

    def init(self: object) -> None:
        self.parser = sympy.parse_expr

    def via_attribute(self: object, answer: str, entry: dict) -> float:
        return float(self.parser(answer) == 1)

    def safe(self: object, answer: str, entry: dict) -> float:
        return float(answer.strip() == entry["answer"])

    assert _audit_class(_planted("ViaHelper", via_helper)).sinks == {"eval"}
    assert _audit_class(_planted("ViaModule", via_module)).sinks == {"sympy"}
    assert _audit_class(_planted("ViaAttribute", via_attribute, __init__=init)).sinks == {"sympy"}
    assert not _audit_class(_planted("Safe", safe)).executes
    # and on the real library: a plain exact-match task is not flagged, an eval one is
    assert not rg_audit.audit_task("chain_sum").executes
    assert rg_audit.audit_task("string_insertion").sinks == {"eval"}


def test_an_upgrade_is_audited_live_at_suite_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rg_audit, "installed_version", lambda: "9.9.9")
    assert rg_audit.scorer_sinks("countdown") == {"sympy"}
    assert rg_audit.scorer_sinks("chain_sum") == frozenset()


# -- dynamic confirmation: on the raw path (no grammar), a code answer runs inside the scorer and forges -----------
@pytest.mark.parametrize("task", NAMED)
def test_named_scorers_execute_a_code_answer_and_can_be_forged_without_the_grammar(task: str) -> None:
    box = Sandbox()
    entry = reasoning_gym.create_dataset(task, seed=0, size=2)[0]
    result = run_reasoning_gym_job(box, ScoreJob(task, 0, 2, 0, FORGE_REPORT, pickle_entry(entry), entry["question"]))
    assert result.score == 1.0, "the code answer did not run in the scorer (is the audit's premise still true?)"
    assert rg_audit.ANSWER_GRAMMARS[task].rejects(FORGE_REPORT) is not None


# -- grammars -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(rg_audit.ANSWER_GRAMMARS))
def test_every_gold_answer_is_inside_its_task_grammar(task: str) -> None:
    grammar = rg_audit.ANSWER_GRAMMARS[task]
    size = 30 if task in ("puzzle24", "intermediate_integration", "countdown") else 100  # slow generators
    for seed in (0, 1):
        for entry in reasoning_gym.create_dataset(task, seed=seed, size=size):
            assert grammar.rejects(str(entry["answer"])) is None, (task, entry["answer"])


HOSTILE_TEXTS = [
    FORGE_REPORT,
    "__import__('os').system('id') or []",
    "[].__class__.__base__.__subclasses__()",
    "open('/etc/passwd').read()",
    "x.__class__",  # attribute access
    "lambda: 0",
    "1 if x else 2",
    "exp(x)('a')",
    "f'{1}'",
    "'a' % 1",
    "sympify('x')",
    "x; y",
    "S('__import__(\"os\")')",
    "x\\\ny",
    "[1, 2] # comment",
    "\u0661 + 1",  # a non-ASCII digit
]


@pytest.mark.parametrize("task", sorted(rg_audit.ANSWER_GRAMMARS))
def test_grammars_reject_code(task: str) -> None:
    grammar = rg_audit.ANSWER_GRAMMARS[task]
    for text in HOSTILE_TEXTS:
        assert grammar.rejects(text) is not None, (task, text)
    assert grammar.rejects("1" * (rg_audit.MAX_ANSWER_CHARS + 1)) is not None


def test_grammars_accept_the_other_forms_the_scorers_take() -> None:
    g = rg_audit.ANSWER_GRAMMARS
    assert g["string_insertion"].rejects("['A', 'B', \"C\"]") is None
    assert g["spiral_matrix"].rejects("[1, 2, -3]") is None
    assert g["binary_matrix"].rejects("[[0, 1], [1, 0]]") is None
    assert g["n_queens"].rejects("[['_', 'Q'], ['Q', '_']]") is None
    assert g["bitwise_arithmetic"].rejects("-0x3eb2") is None and g["bitwise_arithmetic"].rejects("16050") is None
    assert g["intermediate_integration"].rejects("Integral(exp(x**2), x) + C") is None
    assert g["countdown"].rejects("x + 1") is not None  # no names at all where the scorer evals plain arithmetic


# -- refusal ------------------------------------------------------------------------------------------------------
def test_a_forgeable_task_without_grammar_is_refused_unless_opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_EXECUTING_SCORERS_ENV, raising=False)
    with pytest.raises(SarmergeError, match=r"reasoning_gym:composite: its scorer can execute the answer"):
        reasoning_gym_suite("composite")
    monkeypatch.setenv(ALLOW_EXECUTING_SCORERS_ENV, "1")
    assert reasoning_gym_suite("composite").name == "reasoning_gym:composite"


# -- wrong answers the upstream scorers give full marks (hostile review, 2026-12-02) --------------------------------
@functools.cache
def _box() -> Sandbox:
    return Sandbox()  # one probed sandbox for these tests (probing costs seconds)


def _score(task: str, entry: dict, answer: str) -> float | None:
    return run_reasoning_gym_job(_box(), ScoreJob(task, 0, 2, 0, answer, pickle_entry(entry), entry["question"])).score


def test_an_unevaluated_integral_restating_the_question_scores_nothing() -> None:
    entry = next(e for e in reasoning_gym.create_dataset("intermediate_integration", seed=0, size=8)
                 if "Integral" not in str(e["answer"]))
    dataset = reasoning_gym.create_dataset("intermediate_integration", seed=0, size=8)
    restated = f"Integral({entry['metadata']['integrand']}, {entry['metadata']['variable']})"
    assert dataset.score_answer(restated, entry) == 1.0  # upstream: full marks (the premise of this test)
    assert rg_audit.ANSWER_GRAMMARS["intermediate_integration"].rejects(restated) is None  # inside the grammar
    assert _score("intermediate_integration", entry, restated) == 0.0
    assert _score("intermediate_integration", entry, str(entry["answer"])) == 1.0  # the real antiderivative


def test_puzzle24_needs_the_puzzles_numbers_and_exactly_24() -> None:
    entry = next(e for e in reasoning_gym.create_dataset("puzzle24", seed=0, size=8)
                 if sorted(e["metadata"]["numbers"]) != [1, 2, 3, 4])
    dataset = reasoning_gym.create_dataset("puzzle24", seed=0, size=8)
    assert dataset.score_answer("1*2*3*4", entry) == 1.0  # upstream: any four in-range numbers making 24
    assert _score("puzzle24", entry, "1*2*3*4") == 0.0
    truncated = {**entry, "metadata": {**entry["metadata"], "numbers": [5, 5, 5, 1]}}
    assert dataset.score_answer("5*5-1/5", truncated) == 1.0  # upstream: int(24.8) == 24
    assert _score("puzzle24", truncated, "5*5-1/5") == 0.0
    assert _score("puzzle24", entry, str(entry["answer"])) == 1.0  # the gold answer still scores
