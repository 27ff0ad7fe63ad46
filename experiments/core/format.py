"""How numbers are written in tables, comparisons and row info: one place for every report.

Accuracies are fractions in the records and percentages in the text; differences of accuracies are
"points". A minus sign is the true minus (−, U+2212) and ranges use an en dash (–), so that the README's
quotes are unambiguous tokens (``tests/test_readme.py`` finds them in the tables).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from experiments.core.stats import Interval, mean_std

MINUS = "−"
NO_INTERVAL = " (one seed: no CI)"  # an interval needs two seeds


def minus(text: str) -> str:
    """``text`` with ASCII hyphen-minus signs written as true minus signs."""
    return text.replace("-", MINUS)


def pct(values: Iterable[float]) -> str:
    """``mean ± std`` of accuracies (fractions) in percent, two decimals (sample std, 0 for one value)."""
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def points(value: float, signed: bool = True) -> str:
    """A difference of accuracies (fractions) in points, two decimals, signed by default."""
    return minus(f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}")


def span_points(values: Iterable[float]) -> str:
    """``lo–hi`` in points (a negative end keeps its minus sign); one value when the two agree."""
    v = list(values)
    lo, hi = points(min(v), signed=False), points(max(v), signed=False)
    return lo if lo == hi else f"{lo}–{hi}"


def interval_points(iv: Interval, signed: bool = True) -> str:
    """``+0.26 [−0.09, +0.62]``: an interval of a difference of accuracies, in points."""
    if not iv.finite:
        return f"{points(iv.estimate, signed)}{NO_INTERVAL}"
    return f"{points(iv.estimate, signed)} [{points(iv.lo, signed)}, {points(iv.hi, signed)}]"


def number(value: float, digits: int = 3, signed: bool = False) -> str:
    """``value`` with ``digits`` significant digits (``+`` for signed), true minus sign."""
    return minus(f"{value:+.{digits}g}" if signed else f"{value:.{digits}g}")


def interval_number(iv: Interval, digits: int = 3, signed: bool = True) -> str:
    """``+144 [+38.8, +252]``: an interval in the units of its values, ``digits`` significant digits."""
    if not iv.finite:
        return f"{number(iv.estimate, digits, signed)}{NO_INTERVAL}"
    return (f"{number(iv.estimate, digits, signed)} [{number(iv.lo, digits, signed)}, "
            f"{number(iv.hi, digits, signed)}]")


def plural(n: int, word: str) -> str:
    """``1 seed``, ``3 seeds``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def setting_text(setting: dict[str, Any]) -> str:
    """``k=32, kernel=gaussian, lengthscale=0.512``: a chosen setting (floats to three significant digits)."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))
