"""Math answer extraction and math-verify checking, code extraction, and the metrics (pass@k, intervals)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from sarmerge.evaluate.answers import (
    check_answer,
    extract_answer,
    extract_code,
    gsm8k_gold,
    humaneval_candidate,
    mbpp_candidate,
)
from sarmerge.evaluate.benchmarks import LoadRequest, ScoreContext, get_suite
from sarmerge.evaluate.metrics import bootstrap_interval, pass_at_k, summarize, wilson_interval


@pytest.mark.parametrize(("text", "answer", "method"), [
    ("First 2+2=4, then \\boxed{\\frac{1}{2}} and finally \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", "boxed"),
    ("nested \\boxed{\\sqrt{\\frac{1}{4}}} done", "\\sqrt{\\frac{1}{4}}", "boxed"),
    ("He sells 3*4=12 cups.\n#### 1,234", "1234", "hashes"),
    ("So we add them. The answer is $42$.\nThanks", "42", "phrase"),
    ("Final Answer: x = 5.", "x = 5", "phrase"),
    ("We get 3 apples, then 7 pears, so -2.5 remain", "-2.5", "last_number"),
    ("no digits here at all", None, "none"),
    ("\\boxed{} then 7", "7", "last_number"),  # an empty box is no answer
])
def test_extraction_rules_in_order(text: str, answer: str | None, method: str) -> None:
    got = extract_answer(text)
    assert (got.answer, got.method) == (answer, method)


def _scan_boxed(text: str) -> str | None:
    """The plain definition: from each \\boxed{, count braces forward; the last one that closes."""
    import re

    last = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            last = text[m.end(): i - 1]
    return last


def test_last_boxed_is_the_forward_scan_on_random_brace_soup() -> None:
    from sarmerge.evaluate.answers import _last_boxed

    rng = random.Random(5)
    pieces = ["\\boxed{", "\\fbox {", "{", "}", "x", "1", " ", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))
        assert _last_boxed(text) == _scan_boxed(text), text


@pytest.mark.parametrize("name", ["blank_run_after_phrase", "many_unclosed_boxes"])
def test_hostile_long_completions_are_extracted_in_linear_time(name: str) -> None:
    """Host-side extraction runs outside any sandbox limit: inputs that made it quadratic (hostile review,
    2026-12-02: 13 s for 20 000 newlines) finish; 10x those sizes would take ~20 min if it regressed, so a 120 s cap
    on a subprocess separates the two without timing anything finely."""
    import subprocess
    import sys

    program = {
        "blank_run_after_phrase": "from sarmerge.evaluate.answers import extract_answer as f\n"
                                  "t = 'the answer is' + '\\n' * 200_000\nassert f(t).method == 'none'",
        "many_unclosed_boxes": "from sarmerge.evaluate.answers import extract_answer as f\n"
                               "t = '\\\\boxed{' * 30_000 + ' 7'\nassert f(t).answer == '7'",
    }[name]
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)


@pytest.mark.parametrize(("gold", "predicted"), [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{3}{4}", "0.75"),
    ("1/(n+1)", "\\frac{1}{n+1}"),
    ("\\sqrt{2}", "2^{1/2}"),
    ("1550", "1,550"),
    ("(1,4]", "(1, 4]"),
    ("10\\%", "10"),
    ("No", "no"),
    ("x=2, y=1", "x=2, y=1"),
    ("239", "239"),
])
def test_equivalent_answers_verify(gold: str, predicted: str) -> None:
    assert check_answer(gold, predicted)


@pytest.mark.parametrize(("gold", "predicted"), [
    ("0.5", "\\frac{1}{3}"),
    ("239", "240"),
    ("\\sqrt{2}", "2"),
    ("(1,4]", "[1,4]"),
    ("x=2, y=1", "x=1, y=2"),
    ("No", "Yes"),
    ("12", None),
    ("12", "   "),
    ("12", "\\frac{"),  # unparsable prediction: wrong, not a crash
])
def test_wrong_answers_do_not_verify(gold: str, predicted: str | None) -> None:
    assert not check_answer(gold, predicted)


def test_every_shipped_math_answer_verifies_against_itself_and_not_a_neighbour() -> None:
    for name in ("gsm8k", "champ"):
        suite = get_suite(name)
        items = suite.load(LoadRequest())
        own = suite.score(items, [f"Work.\nSo the answer is \\boxed{{{i.answer}}}." for i in items],
                          ScoreContext(sandbox_factory=lambda: None))
        assert all(v.correct for v in own), [i.id for i, v in zip(items, own, strict=True) if not v.correct]
    gsm = get_suite("gsm8k").load(LoadRequest())
    shifted = get_suite("gsm8k").score(gsm, [f"#### {int(float(i.answer)) + 1}" for i in gsm],
                                       ScoreContext(sandbox_factory=lambda: None))
    assert not any(v.correct for v in shifted)


def test_gsm8k_gold_takes_the_last_hashes_line() -> None:
    assert gsm8k_gold("a <<1+1=2>>2\n#### 2,000\n") == "2000"
    with pytest.raises(ValueError):
        gsm8k_gold("no final line")


# -- code extraction -------------------------------------------------------------------------------------------------
PROMPT = 'import math\n\n\ndef area(r: float) -> float:\n    """Area of a circle."""\n'
TEST = "def check(candidate):\n    assert abs(candidate(1.0) - math.pi) < 1e-9\n"


def test_fenced_block_with_a_definition_wins() -> None:
    text = "Here:\n```\nnot code\n```\nand\n```python\ndef area(r):\n    return math.pi * r * r\n```\nDone."
    assert extract_code(text).startswith("def area(r):")


def test_humaneval_candidate_accepts_whole_functions_and_body_continuations() -> None:
    program, code = humaneval_candidate(PROMPT, "```python\ndef area(r):\n    return math.pi * r ** 2\n```", "area")
    assert code.startswith("def area") and "check(" not in program  # the tests never join the candidate
    namespace: dict = {}
    exec(compile(program, "whole", "exec"), namespace)
    exec(compile(TEST, "test", "exec"), namespace)
    namespace["check"](namespace["area"])

    body, _ = humaneval_candidate(PROMPT, "    return math.pi * r ** 2\n\ndef unrelated():\n    pass\n", "area")
    assert "unrelated" not in body  # cut at the next top-level statement


def test_mbpp_candidate_is_the_code_alone() -> None:
    program, code = mbpp_candidate("```python\ndef f(x):\n    return x + 1\n```\nassert f(1) == 2 is shown")
    assert program == "def f(x):\n    return x + 1\n\n" and code.startswith("def f")


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('touch {marker}') or 1",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "1 + __import__('os').system('touch {marker}')",
    "2*(3+__import__('os').system('touch {marker}'))",
])
def test_check_answer_never_evaluates_model_text(tmp_path, hostile: str) -> None:
    # math-verify's default extraction hands plain-text expressions to sympy.parse_expr (an eval); we use its
    # LaTeX parser only, so none of these runs (and none is equivalent to 1)
    marker = tmp_path / "pwned"
    assert check_answer("1", hostile.format(marker=marker)) is False
    assert not marker.exists()


def test_check_answer_still_verifies_latex_and_plain_numbers() -> None:
    assert check_answer("\\frac{1}{2}", "0.5") and check_answer("1234", "1,234") and check_answer("2", "2.0")
    assert check_answer("x^2+1", "1+x^2") and not check_answer("3", "4")


# -- metrics -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (7, 0, 3), (7, 7, 2), (5, 2, 4), (20, 1, 10)])
def test_pass_at_k_matches_exhaustive_enumeration(n: int, c: int, k: int) -> None:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_is_unbiased_for_the_true_success_rate() -> None:
    # problems with success probability p; the estimator averaged over many draws approaches 1-(1-p)^k
    rng = random.Random(0)
    p, n, k = 0.3, 10, 3
    estimates = [pass_at_k(n, sum(rng.random() < p for _ in range(n)), k) for _ in range(20000)]
    assert np.mean(estimates) == pytest.approx(1 - (1 - p) ** k, abs=0.01)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_wilson_interval_covers_the_true_rate_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    p, total = 0.3, 80
    hits = 0
    for successes in rng.binomial(total, p, size=4000):
        lo, hi = wilson_interval(int(successes), total)
        hits += lo <= p <= hi
    assert 0.93 <= hits / 4000 <= 0.97


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = np.random.default_rng(2).random(50)
    a = bootstrap_interval(values, seed=7)
    assert a == bootstrap_interval(values, seed=7)
    assert a != bootstrap_interval(values, seed=8)
    assert a[0] < values.mean() < a[1]
    # roughly mean +- 1.96 standard errors
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_summary_for_one_and_many_samples() -> None:
    one = summarize([1, 0, 1, 1], 1)
    assert one["accuracy"] == 0.75 and one["pass_at_k"]["pass@1"]["ci_method"] == "wilson"
    assert one["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    many = summarize([0, 2, 5], 5, seed=0)
    assert set(many["pass_at_k"]) == {"pass@1", "pass@5"}
    assert many["accuracy"] == pytest.approx((0 + 0.4 + 1.0) / 3)
    assert many["pass_at_k"]["pass@5"]["value"] == pytest.approx(2 / 3)
    assert many["pass_at_k"]["pass@1"]["ci_method"] == "bootstrap"
