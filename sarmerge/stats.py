"""Paired comparisons of two models scored on the same problems, non-inferiority verdicts, and decision sizes.

Two models evaluated on the same problems (same suite, seed and limit) are compared problem by problem: the quantity
is the mean over problems of `a_i - b_i`, where `a_i` is model A's avg@k on problem i (the share of its k samples that
are correct; with one sample, 0 or 1).

- Interval of the paired difference at a confidence `c` (two-sided):
  - one sample per problem: Tango's score interval for a difference of paired proportions (Tango 1998, Stat Med 17:891).
    Unlike a percentile bootstrap it keeps a width when no problem disagrees (3 identical problems do not prove two
    models equal), and its coverage is close to nominal down to a few dozen problems;
  - several samples per problem (avg@k): the percentile bootstrap over problems (seeded), never narrower than the score
    interval on the discordant mass, for the same reason.
- Exact McNemar (sign) test of "no difference" on the problems where the two disagree, reported beside it.
- Non-inferiority of A to B with margin m: `pass` when the whole interval lies above -m (A is at most m worse, at that
  confidence), `fail` when it lies wholly below -m (the evidence says A is worse than the margin allows), otherwise
  `inconclusive` (too few problems to tell). The lower end of a two-sided interval at `c` is a one-sided test at level
  (1-c)/2, so the rate of wrong `pass` verdicts is at most that.
- Decision size: the problems a gate needs so that a model truly equal to its reference passes with probability
  `power`: n = (z_{(1+c)/2} + z_power)^2 * (q - d^2) / (m + d)^2, with q the rate of problems on which the two disagree
  and d the true difference (0 by default) — the normal approximation of the score test above.

Pure numpy and the standard library (the library core stays free of the pipeline's dependencies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

Verdict = Literal["pass", "fail", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("pass", "fail", "inconclusive")


def z_two_sided(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf((1 + confidence) / 2)


@dataclass(frozen=True)
class PairedDifference:
    """Mean over problems of A's score minus B's, with its interval and the counts behind it."""

    difference: float
    low: float
    high: float
    confidence: float
    problems: int
    a_only: float  # problems (avg@k mass) where A is right and B wrong
    b_only: float
    samples_per_problem: int
    method: str
    mcnemar_p: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar (sign) test p-value of 'no difference', from the discordant counts."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def _tango_stat(b: float, c: float, n: int, delta: float) -> float:
    """Tango's score statistic for H0: p(A only) - p(B only) = delta (b, c: discordant counts, n: problems)."""
    a_coef = 2.0 * n
    b_coef = -b - c + (2.0 * n - b + c) * delta
    c_coef = -c * delta * (1.0 - delta)
    disc = max(0.0, b_coef * b_coef - 4.0 * a_coef * c_coef)
    q = (math.sqrt(disc) - b_coef) / (2.0 * a_coef)  # constrained MLE of p(B only)
    var = n * (2.0 * q + delta * (1.0 - delta))  # Var(b - c) under H0
    num = b - c - n * delta
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def tango_interval(b: float, c: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Score interval of p(A only) - p(B only) for n paired binary outcomes with b A-only and c B-only problems."""
    if n <= 0:
        return (-1.0, 1.0)
    if b < 0 or c < 0 or b + c > n + 1e-9:
        raise ValueError(f"discordant counts b={b} c={c} do not fit n={n} problems")
    z = z_two_sided(confidence)
    est = (b - c) / n

    def root(lo: float, hi: float, target: float) -> float:
        # the statistic decreases in delta: bisection on [lo, hi] for stat == target
        for _ in range(100):
            mid = (lo + hi) / 2
            if _tango_stat(b, c, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    eps = 1e-12
    low = -1.0 if _tango_stat(b, c, n, -1.0 + eps) <= z else root(-1.0 + eps, est, z)
    high = 1.0 if _tango_stat(b, c, n, 1.0 - eps) >= -z else root(est, 1.0 - eps, -z)
    return (max(-1.0, min(low, est)), min(1.0, max(high, est)))


def paired_difference(a: Sequence[float], b: Sequence[float], *, samples_per_problem: int = 1,
                      confidence: float = 0.95, seed: int = 0, resamples: int = 4000) -> PairedDifference:
    """Paired difference mean(a - b) over problems; `a[i]`, `b[i]` are the two models' avg@k on problem i."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two equal-length vectors, got shapes {x.shape} and {y.shape}")
    if ((x < 0) | (x > 1) | (y < 0) | (y > 1)).any():
        raise ValueError("per-problem scores must lie in [0, 1]")
    n = int(x.size)
    d = x - y
    a_only, b_only = float(np.clip(d, 0, None).sum()), float(np.clip(-d, 0, None).sum())
    diff = float(d.mean()) if n else 0.0
    binary = samples_per_problem == 1 and bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    low, high = tango_interval(a_only, b_only, n, confidence)
    method = "tango-score"
    if not binary and n:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        blo, bhi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
        low, high = min(low, float(blo)), max(high, float(bhi))
        method = f"paired-bootstrap(avg@{samples_per_problem}, {resamples}, seed {seed}) ∪ score"
    p = mcnemar_exact_p(round(a_only), round(b_only))
    return PairedDifference(diff, low, high, confidence, n, a_only, b_only, samples_per_problem, method, p)


def noninferiority(diff: PairedDifference, margin: float) -> Verdict:
    """Is A at most `margin` worse than B? pass / fail / inconclusive from the interval of A - B."""
    if margin < 0:
        raise ValueError(f"a non-inferiority margin is >= 0, got {margin}")
    if diff.problems == 0:
        return "inconclusive"
    if diff.low > -margin:
        return "pass"
    if diff.high < -margin:
        return "fail"
    return "inconclusive"


def problems_needed(margin: float, *, confidence: float = 0.95, power: float = 0.8, discordance: float = 0.2,
                    true_difference: float = 0.0) -> int:
    """Problems a non-inferiority gate needs to reach a verdict with probability `power`, when the two models disagree
    on a share `discordance` of the problems: for a model `true_difference` from its reference (0: equal) the verdict
    is `pass` when true_difference > -margin and `fail` when it is below -margin."""
    if margin < 0:
        raise ValueError(f"a non-inferiority margin is >= 0, got {margin}")
    distance = abs(margin + true_difference)
    if distance == 0:
        raise ValueError(f"true difference {true_difference} sits exactly on the margin -{margin}: no sample size "
                         "decides it")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if not 0 <= discordance <= 1:
        raise ValueError(f"discordance is a share of problems in [0, 1], got {discordance}")
    var = max(discordance - true_difference ** 2, 1e-12)
    z = z_two_sided(confidence) + NormalDist().inv_cdf(power)
    return max(1, math.ceil(z * z * var / distance ** 2))


def discordance_upper(diff: PairedDifference) -> float:
    """A cautious planning value for the disagreement rate: the upper end of the Wilson 95 % interval of the observed
    share of problems on which the two models disagree (0 observed disagreements does not mean none)."""
    from sarmerge.evaluate.metrics import wilson_interval

    n = diff.problems
    disagreeing = min(n, round(diff.a_only + diff.b_only))
    return wilson_interval(disagreeing, n)[1] if n else 1.0


def per_problem_scores(records: Sequence[dict[str, Any]], suite: str) -> tuple[dict[str, float], int]:
    """avg@k per problem id of one suite from per-sample records (`suite`, `id`, `correct`); returns (scores, k)."""
    right: dict[str, int] = {}
    seen: dict[str, int] = {}
    for r in records:
        if r.get("suite") != suite:
            continue
        pid = str(r["id"])
        seen[pid] = seen.get(pid, 0) + 1
        right[pid] = right.get(pid, 0) + (1 if r.get("correct") is True else 0)
    ks = set(seen.values())
    if len(ks) > 1:
        raise ValueError(f"suite {suite}: problems have different sample counts {sorted(ks)}")
    return {p: right[p] / seen[p] for p in seen}, (ks.pop() if ks else 0)


def pair_scores(a: dict[str, float], b: dict[str, float]) -> tuple[list[float], list[float]]:
    """Align two per-problem score maps on their problem ids; they must cover the same problems."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise ValueError(f"the two evaluations cover different problems (only in the first: {only_a}, only in the "
                         f"second: {only_b}); evaluate both with the same suite, seed and limit")
    ids = sorted(a)
    return [a[i] for i in ids], [b[i] for i in ids]
