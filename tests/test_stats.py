"""sarmerge.stats: paired intervals against closed forms and simulated coverage, the exact McNemar test, the
non-inferiority verdicts over seeds, the decision-size rule checked by simulation, and regression's paired check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sarmerge.evaluate.metrics import wilson_interval
from sarmerge.stats import (
    _tango_stat,
    mcnemar_exact_p,
    noninferiority,
    pair_scores,
    paired_difference,
    per_problem_scores,
    problems_needed,
    tango_interval,
)


def paired_outcomes(rng: np.random.Generator, n: int, p_a: float, p_b: float, p_both: float) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """n problems: both right with p_both, only A right with p_a - p_both, only B right with p_b - p_both."""
    u = rng.random(n)
    a = u < p_a
    b = (u < p_both) | ((u >= p_a) & (u < p_a + p_b - p_both))
    return a.astype(float), b.astype(float)


def verdict_counts(n: int, p_a: float, p_b: float, p_both: float, margin: float, seeds: int = 200) -> dict[str, int]:
    counts = {"pass": 0, "fail": 0, "inconclusive": 0}
    for seed in range(seeds):
        a, b = paired_outcomes(np.random.default_rng(seed), n, p_a, p_b, p_both)
        counts[noninferiority(paired_difference(a, b, seed=seed), margin)] += 1
    return counts


# -- intervals and tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 20, 64, 400])
def test_no_disagreement_keeps_a_width_equal_to_wilsons_bound(n):
    # with b = c = 0 the score interval is ±(Wilson upper bound of 0/n): identical outcomes do not prove equality
    low, high = tango_interval(0, 0, n)
    upper = wilson_interval(0, n)[1]
    assert low == pytest.approx(-upper, abs=1e-9) and high == pytest.approx(upper, abs=1e-9)


def test_score_statistic_at_zero_is_mcnemars():
    for b, c, n in [(7, 2, 50), (0, 5, 10), (13, 13, 64)]:
        assert _tango_stat(b, c, n, 0.0) == pytest.approx((b - c) / math.sqrt(b + c))


def test_interval_holds_the_estimate_and_is_monotone_in_the_counts():
    previous = -2.0
    for b in range(0, 11):
        low, high = tango_interval(b, 10 - b, 64)
        assert low <= (b - (10 - b)) / 64 <= high
        assert low > previous
        previous = low
    assert tango_interval(64, 0, 64)[1] == 1.0 and tango_interval(0, 64, 64)[0] == -1.0


@pytest.mark.parametrize(("n", "p_a", "p_b", "p_both"), [(30, 0.1, 0.1, 0.05), (64, 0.3, 0.3, 0.2),
                                                         (64, 0.45, 0.30, 0.25), (400, 0.5, 0.35, 0.3)])
def test_coverage_is_near_nominal(n, p_a, p_b, p_both):
    seeds = 600
    covered = 0
    for seed in range(seeds):
        a, b = paired_outcomes(np.random.default_rng(1000 + seed), n, p_a, p_b, p_both)
        d = paired_difference(a, b)
        covered += d.low <= p_a - p_b <= d.high
    # 95 % nominal; 600 draws put the binomial 99.9 % band at about ±0.03
    assert 0.92 <= covered / seeds <= 0.995


def test_exact_mcnemar_against_binomial_tails():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(5, 0) == mcnemar_exact_p(0, 5)
    assert mcnemar_exact_p(3, 3) == 1.0
    # 2 vs 10 of 12 discordant: P(X <= 2) = (1 + 12 + 66) / 4096
    assert mcnemar_exact_p(2, 10) == pytest.approx(2 * 79 / 4096)


def test_avg_at_k_uses_every_sample_and_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    skill = rng.random(80)
    a = rng.binomial(4, skill) / 4  # avg@4 of two equally skilled models
    b = rng.binomial(4, skill) / 4
    d1 = paired_difference(a, b, samples_per_problem=4, seed=3)
    d2 = paired_difference(a, b, samples_per_problem=4, seed=3)
    assert d1 == d2 and d1.method.startswith("paired-bootstrap(avg@4")
    assert d1.difference == pytest.approx(float(np.mean(a - b)))
    score_low, score_high = tango_interval(d1.a_only, d1.b_only, 80)
    assert d1.low <= score_low and d1.high >= score_high  # never narrower than the score interval


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paired_difference([2.0], [1.0])
    with pytest.raises(ValueError, match="different problems"):
        pair_scores({"p1": 1.0}, {"p2": 0.0})
    with pytest.raises(ValueError, match="different sample counts"):
        per_problem_scores([{"suite": "s", "id": 1, "correct": True}, {"suite": "s", "id": 2, "correct": True},
                            {"suite": "s", "id": 2, "correct": False}], "s")
    with pytest.raises(ValueError, match="margin"):
        problems_needed(0.05, true_difference=-0.05)


def test_per_problem_scores_are_avg_at_k():
    records = [{"suite": "s", "id": i, "sample": j, "correct": (i + j) % 2 == 0} for i in range(3) for j in range(4)]
    records.append({"suite": "other", "id": 0, "sample": 0, "correct": True})
    scores, k = per_problem_scores(records, "s")
    assert k == 4 and scores == {"0": 0.5, "1": 0.5, "2": 0.5}


# -- non-inferiority verdicts over seeds -----------------------------------------------------------------------------
def test_a_merge_equal_to_its_parent_rarely_fails():
    for n in (64, 400):
        counts = verdict_counts(n, 0.4, 0.4, 0.3, margin=0.03)
        assert counts["fail"] / 200 <= (1 - 0.95) + 0.02, counts


def test_a_true_15_point_drop_on_400_problems_fails():
    counts = verdict_counts(400, 0.35, 0.50, 0.30, margin=0.03)
    assert counts["fail"] >= 198, counts


def test_3_points_on_64_problems_is_inconclusive():
    counts = verdict_counts(64, 0.30, 0.33, 0.25, margin=0.03)
    assert counts["inconclusive"] >= 180, counts


def test_the_issue_example_15_vs_18_of_64_is_inconclusive_not_fail():
    # zoo:code in the embedded demo: SAR 15/64 against its parent's 18/64, most problems shared
    a = np.array([1.0] * 13 + [1.0] * 2 + [0.0] * 5 + [0.0] * 44)
    b = np.array([1.0] * 13 + [0.0] * 2 + [1.0] * 5 + [0.0] * 44)
    d = paired_difference(a, b)
    assert (a.sum(), b.sum()) == (15, 18) and noninferiority(d, 0.03) == "inconclusive"
    assert d.low < -0.03 < d.high


# -- decision size ---------------------------------------------------------------------------------------------------
def test_problems_needed_delivers_its_power():
    # an equal model, 20 % disagreement, margin 10 points: the helper's n passes ~80 % of the time
    n = problems_needed(0.10, confidence=0.95, power=0.8, discordance=0.2)
    counts = verdict_counts(n, 0.3, 0.3, 0.2, margin=0.10, seeds=400)
    assert 0.70 <= counts["pass"] / 400 <= 0.90, (n, counts)
    # and half the problems deliver clearly less
    half = verdict_counts(n // 2, 0.3, 0.3, 0.2, margin=0.10, seeds=400)
    assert half["pass"] < counts["pass"] - 40


def test_problems_needed_scales_as_the_rule_says():
    base = problems_needed(0.03, discordance=0.2)
    assert 1700 <= base <= 1800  # (1.96 + 0.84)^2 * 0.2 / 0.03^2 = 1744
    assert problems_needed(0.06, discordance=0.2) == pytest.approx(base / 4, rel=0.01)
    assert problems_needed(0.03, discordance=0.1) == pytest.approx(base / 2, rel=0.01)
    assert problems_needed(0.03, discordance=0.2, power=0.9) > base


# -- regression: the same statistics, against the recorded evaluation ------------------------------------------------
def _regression(now: np.ndarray, recorded: np.ndarray, k: int = 1, tolerance: float = 0.05) -> str:
    from tasks.params import RegressionCfg
    from tasks.regression import compare_runs

    ids = [f"p{i}" for i in range(len(now))]
    status, _, _ = compare_runs(dict(zip(ids, now, strict=True)), dict(zip(ids, recorded, strict=True)),
                                samples_per_problem=k, cfg=RegressionCfg(tolerance=tolerance), seed=0)
    return status


def test_reevaluating_an_unchanged_model_is_never_flagged():
    statuses = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        skill = rng.random(200)
        greedy = (skill > 0.5).astype(float)
        statuses.append(_regression(greedy, greedy.copy()))  # greedy: the same outputs again
        # sampled, avg@4: two independent evaluations of the same model
        statuses.append(_regression(rng.binomial(4, skill) / 4, rng.binomial(4, skill) / 4, k=4))
    assert "drop" not in statuses
    assert statuses[0::2] == ["ok"] * 200  # 200 identical greedy problems do rule out 5 points


def test_a_real_10_point_drop_is_always_flagged():
    # the drop loses 15 % of problems and gains 5 % elsewhere (churn), on as many problems as the rule asks for
    n = problems_needed(0.05, true_difference=-0.10, discordance=0.20, power=0.999)
    flagged = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        recorded = (rng.random(n) < 0.6).astype(float)
        u = rng.random(n)
        now = recorded.copy()
        lost = (recorded == 1) & (u < 0.15 / 0.6)
        gained = (recorded == 0) & (u < 0.05 / 0.4)
        now[lost], now[gained] = 0.0, 1.0
        flagged += _regression(now, recorded) == "drop"
    assert flagged == 200
