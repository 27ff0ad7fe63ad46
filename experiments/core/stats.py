r"""The statistics behind every table: intervals over seeds, verdicts, multiplicity, aggregates.

One module, used by every report (``experiments/reports/``); the experiments themselves compute none.

Intervals (``Interval``) of a mean over seeds:

- ``t_interval(values)``: Student's t, :math:`\bar x \pm t_{n-1,\,1-\alpha/2}\, s/\sqrt n`. For paired
  differences (two methods on the same seeds) it is the paired t-interval. It covers at its nominal level
  for any n >= 2 when the per-seed values are roughly normal, which a percentile bootstrap does not at
  small n: with 3 seeds a "95 %" percentile bootstrap interval of a mean is about the min-max of three
  numbers (about 75 % coverage). It is the default of every comparison.
- ``stratified_t_interval(per_task)``: the mean over tasks (environments) of each task's mean, with the
  standard error :math:`\frac{1}{T}\sqrt{\sum_t s_t^2/n_t}` and Welch-Satterthwaite degrees of freedom:
  an aggregate across tasks whose runs are independent (different environments share no randomness), with
  different run counts per task.
- ``bootstrap_interval(values)`` and ``stratified_bootstrap(per_task, statistic)``: percentile bootstrap
  (rliable, Agarwal et al., 2021), for statistics without a t-interval (IQM, performance profiles). Use
  them for description; a percentile bootstrap is only trusted from ``BOOTSTRAP_MIN_N`` runs a task.

Verdicts (``verdict``) are computed from an interval, never written by hand: "better" when the whole
interval lies above the null value (0 for a difference), "worse" when it lies below, "not separated"
otherwise (including when it cannot be computed: fewer than two seeds). ``holm`` adjusts a family of
t-type intervals for multiple comparisons (Holm, 1979): each comparison's interval is widened to the
level its rank calls for, and the step-down stops at the first comparison that is not separated.
Everything here is deterministic (the bootstraps are seeded), so the same records give the same
intervals and verdicts on any machine.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np

LEVEL = 0.95                 # the tables' confidence level
BOOTSTRAP_MIN_N = 10         # runs a task below which a percentile bootstrap under-covers
VERDICTS = ("better", "worse", "not separated")


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval.

    ``estimate``, ``lo``, ``hi``; ``n`` the number of runs (seeds) behind it; ``level`` (e.g. 0.95);
    ``method`` ("t", "stratified t", "bootstrap", "stratified bootstrap", optionally "+ Holm");
    ``se`` and ``df`` for t-type intervals (NaN otherwise): what ``holm`` needs to re-level them.
    ``lo``/``hi`` are NaN when the interval cannot be computed (fewer than two runs).
    """

    estimate: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL
    method: str = "t"
    se: float = math.nan
    df: float = math.nan

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def p_value(self, null: float = 0.0) -> float:
        """Two-sided p-value of ``estimate == null`` for a t-type interval (NaN otherwise)."""
        if not (math.isfinite(self.se) and math.isfinite(self.df)) or self.se <= 0:
            if math.isfinite(self.se) and self.se == 0 and self.n >= 2:
                return 0.0 if self.estimate != null else 1.0
            return math.nan
        from scipy import stats as st

        t = abs(self.estimate - null) / self.se
        return float(2.0 * st.t.sf(t, self.df))

    def at_level(self, level: float) -> "Interval":
        """The same t-type interval at another confidence level."""
        if not (math.isfinite(self.se) and math.isfinite(self.df)):
            raise ValueError(f"a {self.method} interval has no standard error to re-level")
        half = _t_quantile(level, self.df) * self.se
        return replace(self, lo=self.estimate - half, hi=self.estimate + half, level=level)


def _t_quantile(level: float, df: float) -> float:
    from scipy import stats as st

    return float(st.t.ppf(0.5 + level / 2.0, df))


def _values(values: Iterable[float]) -> np.ndarray:
    v = np.asarray(list(values), dtype=float)
    if v.ndim != 1:
        raise ValueError(f"expected a flat list of numbers, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("statistics of non-finite values (NaN or inf)")
    return v


def t_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """Mean of ``values`` (e.g. per-seed paired differences) with its Student-t interval; NaN bounds below
    two values. Zero spread gives a zero-width interval."""
    v = _values(values)
    n = len(v)
    if n == 0:
        raise ValueError("an interval of no values")
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level, "t")
    se = float(v.std(ddof=1) / math.sqrt(n))
    half = _t_quantile(level, n - 1) * se
    return Interval(mean, mean - half, mean + half, n, level, "t", se, float(n - 1))


def paired_differences(a: dict, b: dict) -> tuple[list, list[float]]:
    """The seeds present in both ``a`` and ``b`` ({seed: value}) and the differences a - b on them."""
    seeds = sorted(set(a) & set(b), key=str)
    return seeds, [float(a[s]) - float(b[s]) for s in seeds]


def stratified_t_interval(per_task: Sequence[Iterable[float]], level: float = LEVEL) -> Interval:
    """Mean over tasks of each task's mean, with a Welch-Satterthwaite t-interval (see the module doc).

    Every task needs at least two values; ``n`` is the total number of runs."""
    tasks = [_values(t) for t in per_task]
    if not tasks:
        raise ValueError("an aggregate over no tasks")
    n_total = sum(len(t) for t in tasks)
    estimate = float(np.mean([t.mean() for t in tasks]))
    if any(len(t) < 2 for t in tasks):
        return Interval(estimate, math.nan, math.nan, n_total, level, "stratified t")
    k = len(tasks)
    parts = [t.var(ddof=1) / len(t) / k ** 2 for t in tasks]
    var = float(sum(parts))
    if var == 0.0:
        return Interval(estimate, estimate, estimate, n_total, level, "stratified t", 0.0, math.inf)
    df = var ** 2 / sum(p ** 2 / (len(t) - 1) for p, t in zip(parts, tasks))
    se = math.sqrt(var)
    half = _t_quantile(level, df) * se
    return Interval(estimate, estimate - half, estimate + half, n_total, level, "stratified t", se, float(df))


def verdict(interval: Interval, higher_is_better: bool = True, null: float = 0.0) -> str:
    """"better", "worse" or "not separated": where ``interval`` lies against ``null`` (for a difference
    A - B, "better" means A is better than B)."""
    if not interval.finite:
        return "not separated"
    if interval.lo > null:
        return "better" if higher_is_better else "worse"
    if interval.hi < null:
        return "worse" if higher_is_better else "better"
    return "not separated"


def holm(intervals: Sequence[Interval], level: float = LEVEL, null: float = 0.0) -> list[Interval]:
    """Holm's step-down correction of a family of t-type intervals, in the order given.

    With m comparisons ordered by p-value, the i-th (1-based) is tested at alpha / (m - i + 1): its interval is
    recomputed at the level 1 - alpha / (m - i + 1); the step-down stops at the first one that is not
    separated from ``null``, and every later one is then reported not separated (its interval is widened to
    the Bonferroni level 1 - alpha / m, which then contains ``null``). An interval that cannot be computed
    (fewer than two runs) stays as it is and counts as not separated. One comparison: unchanged."""
    alpha = 1.0 - level
    m = len(intervals)
    out: list[Interval | None] = [None] * m
    usable = [i for i, iv in enumerate(intervals) if iv.finite]
    for i, iv in enumerate(intervals):
        if not iv.finite:
            out[i] = replace(iv, method=f"{iv.method} + Holm ({m})")
    order = sorted(usable, key=lambda i: (intervals[i].p_value(null), i))
    stopped = False
    for rank, i in enumerate(order):
        iv = intervals[i]
        step = 1.0 - alpha / (m - rank)
        adjusted = iv.at_level(step if not stopped else 1.0 - alpha / m) if m > 1 else iv
        if not stopped and verdict(adjusted, null=null) == "not separated":
            stopped = True
        if stopped and verdict(adjusted, null=null) != "not separated":
            adjusted = _containing(adjusted, null)
        out[i] = replace(adjusted, method=f"{iv.method} + Holm ({m})" if m > 1 else iv.method)
    return out  # type: ignore[return-value]


def _containing(iv: Interval, null: float) -> Interval:
    """``iv`` widened just enough to contain ``null`` (a comparison the step-down did not reach)."""
    return replace(iv, lo=min(iv.lo, null), hi=max(iv.hi, null))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = list(values)
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


# ----------------------------------------------------------------------------------------- bootstraps
@contextlib.contextmanager
def rliable_seed(seed: int = 0):
    """Make rliable's bootstraps reproducible: rliable 1.2 draws its resampling indices from numpy's global
    generator (``np.random.choice``), ignoring the ``random_state`` it is given. Seeds the global generator
    for the block and puts its state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def stratified_bootstrap(per_task: Sequence[Iterable[float]], statistic: Callable[[np.ndarray], float],
                         reps: int, level: float = LEVEL) -> Interval:
    """``statistic`` of the pooled runs of every task with rliable's stratified percentile bootstrap (runs
    resampled within each task; tasks may have different run counts), seeded."""
    from rliable import library as rly

    tasks = [np.asarray(list(t), dtype=float) for t in per_task]
    with warnings.catch_warnings(), rliable_seed(0):  # arch deprecates the RandomState rliable passes
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates({"x": tasks}, lambda *t: np.array([statistic(np.concatenate(t))]),
                                               reps=reps, confidence_interval_size=level,
                                               random_state=np.random.RandomState(0))
    method = "stratified bootstrap" if len(tasks) > 1 else "bootstrap"
    return Interval(float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0]), sum(map(len, tasks)), level,
                    method)


def bootstrap_interval(values: Iterable[float], reps: int = 2_000, level: float = LEVEL) -> Interval:
    """Mean of ``values`` with its percentile bootstrap interval (rliable, ``reps`` replicates, seeded);
    NaN bounds below two values. Under-covers at small n (see the module doc): prefer ``t_interval``."""
    v = _values(values)
    if len(v) < 2:
        return Interval(float(v.mean()), math.nan, math.nan, len(v), level, "bootstrap")
    return stratified_bootstrap([v], np.mean, reps, level)


def iqm(x) -> float:
    """Interquartile mean (rliable's ``aggregate_iqm``: the 25 %-trimmed mean of all runs)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(x, dtype=float)[:, None]))
