"""The smoke table's report: each probe's test accuracy, and SK − k-NN paired over seeds with its verdict."""
from __future__ import annotations

from experiments.core import stats
from experiments.core.format import interval_points, pct, plural
from experiments.reports.common import by_seed, compare_family, comparison_line, seed_count


def comparisons(records: list[dict]) -> list[str]:
    """Each probe's test accuracy (mean ± std over seeds, as in the table) and SK − k-NN in points, paired
    over seeds (the same split), with its Student-t interval and verdict."""
    acc = by_seed(records, lambda k: k["probe"])
    if not acc:
        return []
    lines = [f"- Test accuracy (%, mean ± std over {plural(seed_count(records), 'seed')}): "
             + "; ".join(f"{p} {pct(v.values())}" for p, v in acc.items())]
    if "sk" in acc and "knn" in acc:
        (c,) = compare_family([("sk − knn", stats.paired_differences(acc["sk"], acc["knn"])[1])])
        lines.append(comparison_line(c, interval_points, "points"))
    return lines
