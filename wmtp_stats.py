"""Intervals and paired tests for comparing models: Wilson and bootstrap intervals on pass@k, the
t-interval over seeds, McNemar's exact test and the paired bootstrap on the same problems.

Plain functions of counts (numpy and scipy only): what eval_mtp.py prints beside every pass@k and
what compare_mtp.py reports for a difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
from scipy import stats

RESAMPLES = 10_000  # bootstrap resamples by default
LEVEL = 0.95  # confidence of every interval


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k} with n={n} samples")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_per_problem(counts: Sequence[tuple[int, int]], k: int) -> np.ndarray:
    """The unbiased pass@k of each problem from its (n samples, c correct), as an array."""
    return np.array([pass_at_k(n, c, k) for n, c in counts], dtype=np.float64)


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (pass@1 with one sample per problem)."""
    if trials <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per problem), resampling problems."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def pass_at_k_interval(
    counts: Sequence[tuple[int, int]], k: int, *, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The 95% interval of pass@k over problems: Wilson when every problem has one sample (n = 1),
    else the percentile bootstrap of the unbiased pass@k over problems."""
    if all(n == 1 for n, _ in counts):
        return wilson_interval(sum(c for _, c in counts), len(counts))
    return bootstrap_interval(pass_at_k_per_problem(counts, k), resamples=resamples, seed=seed)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value from the discordant pairs (problems only A passes, only B
    passes): twice the binomial(b + c, 1/2) tail of the smaller count, at most 1."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_table(a: dict[str, bool], b: dict[str, bool]) -> dict[str, int]:
    """The 2×2 table of two models' pass/fail on the same problems (dicts of task id -> passed)."""
    if a.keys() != b.keys():
        raise ValueError("paired_table needs the same problems on both sides")
    pairs = [(a[t], b[t]) for t in a]
    return {
        "both": sum(x and y for x, y in pairs),
        "only_a": sum(x and not y for x, y in pairs),
        "only_b": sum(y and not x for x, y in pairs),
        "neither": sum(not x and not y for x, y in pairs),
    }


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean of a − b, interval low, interval high): the percentile bootstrap of the mean paired
    difference, resampling problems (the same resampled problems on both sides)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_interval(d, resamples=resamples, seed=seed)
    return float(d.mean()) if len(d) else math.nan, lo, hi


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean over seeds (nan bounds for one value)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def welch_interval(
    a: Sequence[float], b: Sequence[float], level: float = LEVEL
) -> tuple[float, float, float]:
    """(mean a − mean b, low, high): Welch's t interval of a difference of means over seeds (nan
    bounds unless both sides have two or more values)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    if len(x) < 2 or len(y) < 2:
        return diff, math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return diff, diff, diff
    dof = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    return diff, diff - half, diff + half
