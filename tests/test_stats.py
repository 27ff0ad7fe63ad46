"""The statistics module behind every table: intervals, verdicts on hand-made intervals, Holm, aggregates."""
import math

import numpy as np
import pytest
from scipy import stats as st

from experiments.core import stats
from experiments.core.stats import Interval


def iv(lo, hi, n=10):
    return Interval((lo + hi) / 2, lo, hi, n)


@pytest.mark.parametrize("lo, hi, want", [(0.1, 0.5, "better"), (-0.5, -0.1, "worse"), (-0.1, 0.5, "not separated"),
                                          (0.0, 0.5, "not separated"), (-0.5, 0.0, "not separated")])
def test_verdict_on_hand_made_intervals(lo, hi, want):
    assert stats.verdict(iv(lo, hi)) == want


def test_verdict_when_lower_is_better_and_against_another_null():
    assert stats.verdict(iv(0.1, 0.5), higher_is_better=False) == "worse"
    assert stats.verdict(iv(-0.5, -0.1), higher_is_better=False) == "better"
    assert stats.verdict(iv(0.1, 0.5), null=0.2) == "not separated"
    assert stats.verdict(iv(0.3, 0.5), null=0.2) == "better"


def test_an_interval_that_cannot_be_computed_is_not_separated():
    one = stats.t_interval([3.0])
    assert math.isnan(one.lo) and math.isnan(one.hi) and one.n == 1
    assert stats.verdict(one) == "not separated"


def test_t_interval_is_scipys_student_t_interval():
    x = [0.3, -0.1, 0.5, 0.2, 0.4]
    got = stats.t_interval(x)
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    assert got.estimate == pytest.approx(np.mean(x))
    assert (got.lo, got.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert got.n == 5 and got.df == 4


def test_t_interval_covers_at_three_seeds_where_the_min_max_does_not():
    rng = np.random.default_rng(0)
    draws = rng.normal(1.0, 2.0, size=(4000, 3))
    t_cover = np.mean([(i := stats.t_interval(d)).lo <= 1.0 <= i.hi for d in draws])
    minmax_cover = np.mean((draws.min(1) <= 1.0) & (1.0 <= draws.max(1)))
    assert 0.93 <= t_cover <= 0.97
    assert minmax_cover < 0.8  # what a 95 % percentile bootstrap of three values amounts to


def test_zero_spread_gives_a_zero_width_interval_and_a_verdict():
    got = stats.t_interval([0.5, 0.5, 0.5])
    assert got.lo == got.hi == 0.5
    assert stats.verdict(got) == "better"


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        stats.t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        stats.t_interval([])


def test_holm_leaves_one_comparison_alone():
    one = stats.t_interval([0.1, 0.3, 0.2, 0.25])
    assert stats.holm([one]) == [one]


def test_holm_tests_the_smallest_p_value_at_alpha_over_m_then_steps_down():
    strong = stats.t_interval([1.0, 1.1, 0.9, 1.05, 0.95])
    marginal = stats.t_interval([0.3, 0.05, 0.4, 0.1, 0.2])  # p = 0.031: separated at 95 %, not at 97.5 %
    assert stats.verdict(marginal) == "better"
    assert stats.verdict(marginal.at_level(0.975)) == "not separated"
    a, b = stats.holm([strong, marginal])
    # strong: rank 1, at 1 - 0.05/2; marginal: rank 2, at 1 - 0.05/1, so it keeps its verdict
    assert (a.lo, a.hi) == (pytest.approx(strong.at_level(0.975).lo), pytest.approx(strong.at_level(0.975).hi))
    assert (b.lo, b.hi) == (pytest.approx(marginal.lo), pytest.approx(marginal.hi))
    assert [stats.verdict(a), stats.verdict(b)] == ["better", "better"]
    assert "Holm (2)" in a.method


def test_holm_stops_at_the_first_comparison_that_is_not_separated():
    marginal = stats.t_interval([0.3, 0.05, 0.4, 0.1, 0.2])
    twice = stats.holm([marginal, marginal])
    assert [stats.verdict(x) for x in twice] == ["not separated", "not separated"]
    assert all(x.lo <= 0.0 <= x.hi for x in twice)


def test_stratified_t_interval_is_the_mean_of_task_means_with_welch_degrees_of_freedom():
    a, b = [1.0, 2.0, 3.0], [10.0, 12.0, 14.0, 16.0]
    got = stats.stratified_t_interval([a, b])
    va, vb = np.var(a, ddof=1) / 3 / 4, np.var(b, ddof=1) / 4 / 4
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert got.estimate == pytest.approx((2.0 + 13.0) / 2)
    assert got.se == pytest.approx(se) and got.df == pytest.approx(df)
    assert got.hi - got.estimate == pytest.approx(st.t.ppf(0.975, df) * se)
    assert got.n == 7
    assert math.isnan(stats.stratified_t_interval([a, [5.0]]).lo)


def test_bootstrap_is_reproducible_and_leaves_numpys_generator_alone():
    pytest.importorskip("rliable")
    x = list(np.linspace(-1, 2, 12))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    one, two = stats.bootstrap_interval(x, reps=300), stats.bootstrap_interval(x, reps=300)
    assert (one.lo, one.hi) == (two.lo, two.hi)
    assert one.lo < np.mean(x) < one.hi
    assert np.array_equal(np.random.get_state()[1], before)
