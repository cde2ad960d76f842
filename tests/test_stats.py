"""wmtp_stats against hand-worked numbers and scipy: pass@k, Wilson, bootstrap, t and Welch
intervals, McNemar's exact test, the paired table and the paired bootstrap."""

import math

import numpy as np
import pytest
from scipy import stats

from wmtp_stats import (
    bootstrap_interval,
    mcnemar_exact,
    paired_bootstrap,
    paired_table,
    pass_at_k,
    pass_at_k_interval,
    pass_at_k_per_problem,
    t_interval,
    welch_interval,
    wilson_interval,
)


def test_pass_at_k_is_one_minus_the_chance_that_k_draws_all_fail():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 5), (20, 1, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_wilson_by_hand_and_against_scipy():
    # 5/20 at 95%: z = 1.959964; by hand (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z, p, n = 1.959963984540054, 0.25, 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(5, 20) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(5, 20) == pytest.approx((0.1118617, 0.4687009), abs=1e-6)
    for k, n in [(0, 20), (20, 20), (7, 31), (1, 164)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)  # "0/20 reaches ~16%"


def test_bootstrap_interval_against_scipy_percentile():
    x = np.random.default_rng(1).random(60)
    ours = bootstrap_interval(x, resamples=20_000, seed=3)
    ref = stats.bootstrap(
        (x,), np.mean, n_resamples=20_000, method="percentile", random_state=4
    ).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.01)
    assert bootstrap_interval(x, seed=5) == bootstrap_interval(x, seed=5)  # seeded
    assert ours[0] < x.mean() < ours[1]


def test_pass_at_k_interval_uses_wilson_for_one_sample_else_the_bootstrap():
    ones = [(1, 1)] * 5 + [(1, 0)] * 15
    assert pass_at_k_interval(ones, 1) == wilson_interval(5, 20)
    many = [(10, c) for c in (0, 1, 3, 10, 5, 2, 0, 7)]
    per = pass_at_k_per_problem(many, 5)
    assert per.tolist() == [pass_at_k(10, c, 5) for _, c in many]
    assert pass_at_k_interval(many, 5, seed=2) == bootstrap_interval(per, seed=2)


def test_mcnemar_exact_hand_worked():
    # b = 8 (only A), c = 2 (only B): p = 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * 56/1024
    assert mcnemar_exact(8, 2) == pytest.approx(0.109375)
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    for b, c in [(8, 2), (12, 3), (0, 6), (30, 18)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c).pvalue)


def test_paired_table_and_bootstrap_on_the_same_problems():
    a = {"t1": True, "t2": True, "t3": False, "t4": False, "t5": True}
    b = {"t1": True, "t2": False, "t3": True, "t4": False, "t5": False}
    assert paired_table(a, b) == {"both": 1, "only_a": 2, "only_b": 1, "neither": 1}
    with pytest.raises(ValueError, match="same problems"):
        paired_table(a, {"t1": True})
    x, y = [1.0, 0.5, 0.0, 0.25], [0.5, 0.5, 0.0, 0.0]
    diff, lo, hi = paired_bootstrap(x, y, seed=1)
    assert diff == pytest.approx(0.1875)
    assert (lo, hi) == bootstrap_interval([0.5, 0.0, 0.0, 0.25], seed=1)


def test_t_and_welch_intervals_against_scipy():
    v = [2.1, 2.4, 1.9]
    mean, lo, hi = t_interval(v)
    # by hand: t_{0.975, 2} = 4.302652729911275, s = 0.2516611, half = t·s/sqrt(3)
    half = 4.302652729911275 * np.std(v, ddof=1) / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((np.mean(v), np.mean(v) - half, np.mean(v) + half))
    assert math.isnan(t_interval([1.0])[1])
    a, b = [2.1, 2.4, 1.9, 2.2], [2.5, 2.6, 2.9]
    diff, lo, hi = welch_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (diff, lo, hi) == pytest.approx((np.mean(a) - np.mean(b), ci.low, ci.high))
