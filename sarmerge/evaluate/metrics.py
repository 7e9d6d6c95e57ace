"""Accuracy / pass@k with 95 % intervals.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples per problem of which c are correct,
pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems. With one sample per problem the interval is Wilson's score
interval on the number of solved problems; with several it is a seeded percentile bootstrap over problems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples (drawn from n with c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # product form of 1 - C(n-c, k)/C(n, k): stable for large n
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # exact ends at 0 and all successes (the formula leaves rounding dust there)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == total else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_interval(values: Sequence[float], *, seed: int, resamples: int = 2000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling problems), deterministic for a seed."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def default_ks(n: int) -> list[int]:
    return sorted({1, n} | {k for k in (5, 10, 20, 50, 100) if k <= n})


def summarize(correct: Sequence[int], n: int, *, ks: Sequence[int] | None = None, seed: int = 0) -> dict:
    """Metrics for problems with `correct[i]` of `n` samples right: accuracy, pass@k and their 95 % intervals."""
    ks = [k for k in (ks or default_ks(n)) if 1 <= k <= n]
    problems = len(correct)
    out: dict = {"problems": problems, "samples_per_problem": n, "correct_samples": int(sum(correct))}
    per_k = {}
    for k in ks:
        scores = [pass_at_k(n, c, k) for c in correct]
        mean = float(np.mean(scores)) if scores else 0.0
        if n == 1:
            interval, method = wilson_interval(int(sum(correct)), problems), "wilson"
        else:
            interval, method = bootstrap_interval(scores, seed=seed), "bootstrap"
        per_k[f"pass@{k}"] = {"value": mean, "ci95": [interval[0], interval[1]], "ci_method": method}
    out["accuracy"] = per_k["pass@1"]["value"] if per_k else 0.0
    out["ci95"] = per_k["pass@1"]["ci95"] if per_k else [0.0, 1.0]
    out["pass_at_k"] = per_k
    return out
