"""The CNN readout table's report (experiments/cnn_readout.py runs it): comparisons and the figure.

- each readout's test accuracy, mean ± std over seeds (as in the table);
- paired differences (``DIFFERENCES``) in points: the mean over the seeds where both ran (same split and
  initial weights: paired) with its Student-t interval over seeds, Holm-adjusted over the family, and its
  verdict; the paper's claims (``CLAIMS``) with verdicts computed from them;
- the settings each readout chose on validation, and what choosing cost (``select_s``, ``settings_tried``),
  with SK's selection time on frozen features against the MLP head's.
"""
from __future__ import annotations

import statistics
from collections import Counter

import numpy as np

from experiments.core import stats
from experiments.core.format import interval_points, pct, plural, setting_text
from experiments.reports.common import by_seed, claim_line, compare_family, comparison_line, seed_count

DIFFERENCES = [("sk_frozen", "linear_joint"), ("sk_frozen", "mlp_frozen"), ("sk_frozen", "knn_frozen"),
               ("sk_e2e", "linear_joint"), ("sk_e2e", "linear_joint_short")]
CLAIMS = [  # (the paper's claim, the comparisons it rests on, each expected "better")
    ("an SK readout of frozen CNN features, trained on nothing, is more accurate than trained neural readouts of "
     "the same features.", ["sk_frozen − linear_joint", "sk_frozen − mlp_frozen"]),
    ("training a backbone end to end through an SK head gives a better classifier than through a linear head for "
     "the same short training budget.",
     ["sk_e2e − linear_joint_short"]),
]


def comparisons(records: list[dict]) -> list[str]:
    """What the README quotes from one section of the table (``scripts/make_tables.py`` calls it)."""
    if not records:
        return []
    acc = by_seed(records, lambda k: k["readout"])
    readouts = list(acc)
    seeds = plural(seed_count(records), "seed")
    lines = [f"- Test accuracy (%, mean ± std over {seeds}): "
             + "; ".join(f"{r} {pct(acc[r].values())}" for r in readouts)]
    family = compare_family([(f"{a} − {b}", stats.paired_differences(acc[a], acc[b])[1])
                             for a, b in DIFFERENCES if a in acc and b in acc])
    if family:
        lines.append("- Paired differences in test accuracy (the same split and initial weights for every readout), "
                     "in points, with Student-t intervals over seeds, Holm-adjusted over the comparisons below; a "
                     "verdict is \"better\" or \"worse\" when the interval excludes 0:")
        lines += ["  " + comparison_line(c, interval_points, "points") for c in family]
        named = {c.name: c for c in family}
        lines += [claim_line(text, [named[n] for n in names if n in named]) for text, names in CLAIMS]
    return lines + _chosen(records, readouts) + _costs(records, readouts)


def _chosen(records: list[dict], readouts: list[str]) -> list[str]:
    chosen: dict[str, Counter] = {}
    for rec in records:
        for row in rec["rows"]:
            scores = row.get("selection") or row.get("selection_scores")  # backbone runs' | probes'
            if scores:  # the first best, as the selection chose it
                best = max(scores, key=lambda e: e["val_acc"])
                setting = setting_text({k: v for k, v in best.items() if k != "val_acc"})
                chosen.setdefault(row["keys"]["readout"], Counter())[setting] += 1
    if not chosen:
        return []
    return ["- Chosen on validation (seeds choosing it): " + "; ".join(
        f"{r} " + ", ".join(f"`{c}` ({k})" for c, k in chosen[r].most_common()) for r in readouts if r in chosen)]


def _costs(records: list[dict], readouts: list[str]) -> list[str]:
    cost = by_seed(records, lambda k: k["readout"], "select_s")
    tried = by_seed(records, lambda k: k["readout"], "settings_tried")
    parts = [f"{r} {statistics.fmean(cost[r].values()):.3g} s for {statistics.fmean(tried[r].values()):.0f} settings"
             for r in readouts if r in cost and r in tried and max(tried[r].values()) > 1]
    if not parts:
        return []
    line = "- Selection cost (seconds choosing hyperparameters on validation, mean over seeds): " + "; ".join(parts)
    if "sk_frozen" in cost and "mlp_frozen" in cost and statistics.fmean(cost["mlp_frozen"].values()) > 0:
        ratio = statistics.fmean(cost["sk_frozen"].values()) / statistics.fmean(cost["mlp_frozen"].values())
        line += f"; SK on frozen features took {ratio:.2f}× the MLP head's selection time"
    return [line]


def make_figure(records: list[dict], path) -> None:
    """Test accuracy against training epochs for readouts 1 and 4: mean over seeds with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"linear_joint": "linear head, trained jointly (readout 1)",
              "sk_e2e": "backbone trained through SK (readout 4)"}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    for name, label in labels.items():
        by_x: dict[float, list[float]] = {}
        for rec in records:
            c = rec.get("curves", {}).get(name)
            if not c:
                continue
            for x, y in zip(c["x"], c["y"]):
                by_x.setdefault(float(x), []).append(float(y))
        if not by_x:
            continue
        xs = sorted(by_x)
        mean = np.array([np.mean(by_x[x]) for x in xs])
        std = np.array([np.std(by_x[x]) for x in xs])
        n = min(len(by_x[x]) for x in xs)
        line, = ax.plot(xs, mean, marker="o", label=f"{label} (n={n})")
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        drawn = True
    ax.set_xlabel("training epochs")
    ax.set_ylabel("test accuracy")
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
