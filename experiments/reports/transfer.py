"""The transfer table's report (experiments/transfer.py runs it): comparisons and the figure.

Per setting: at every n, SK minus each other probe in points, mean over the seeds where both ran (the
same labelled draw: paired) with its Student-t interval, Holm-adjusted over every comparison of the setting,
and its verdict; fine-tuning minus SK at each n; the range over n of SK minus each probe; the paper's claim
with a verdict computed from SK − linear and SK − fine-tuning at the few-label shot counts.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from experiments.core import stats
from experiments.core.format import interval_points, points, span_points
from experiments.reports.common import by_seed, claim_line, compare_family, comparison_line, probe_label

ALL = "all"
NOT_TRAINED = ("sk", "knn", "ncm")  # drawn solid in the figure


def _shots_order(shots: str) -> tuple:
    return (1, 0) if shots == ALL else (0, int(shots))


def _methods(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["keys"]["method"] for rec in records for row in rec["rows"]))


CLAIM = ("SK on frozen features transfers with no training, and is strongest when labels are few: with "
         "{shots} labelled examples a class it is more accurate than the trained linear probe and fine-tuning.")
FEW = 5  # "few labels": the claim is tested at every n up to this many examples a class


def comparisons(records: list[dict]) -> list[str]:
    """What the README quotes from one section of the table (``scripts/make_tables.py`` calls it)."""
    acc = by_seed(records, lambda k: (k["setting"], str(k["shots"]), k["method"]))
    lines = ["- Differences in test accuracy, SK − each probe, in points: mean over the seeds (one labelled draw "
             "each, shared by every probe) with Student-t intervals of the paired per-seed differences, "
             "Holm-adjusted over every comparison of the setting; a verdict is \"better\" or \"worse\" when the "
             "interval excludes 0."]
    for setting in dict.fromkeys(k[0] for k in acc):
        lines += _setting_lines(records, acc, setting)
    return lines


def _setting_lines(records: list[dict], acc: dict, setting: str) -> list[str]:
    shots = sorted({k[1] for k in acc if k[0] == setting}, key=_shots_order)
    methods = [m for m in _methods(records) if m != "sk" and any(k[0] == setting and k[2] == m for k in acc)]
    named, means = [], {m: {} for m in methods}
    for n in shots:
        sk_acc = acc.get((setting, n, "sk"))
        for m in methods if sk_acc else []:
            seeds, d = stats.paired_differences(sk_acc, acc.get((setting, n, m), {}))
            if seeds:
                named.append((f"SK − {probe_label(m)}, {_shots_label(records, setting, n)}", d))
                means[m][n] = float(sum(d) / len(d))
    family = compare_family(named)
    lines = [f"- `{setting}`:"] + ["  " + comparison_line(c, interval_points, "points") for c in family]
    if means.get("finetune"):
        per_n = ", ".join(f"{points(-v)} ({n})" for n, v in sorted(means["finetune"].items(), key=lambda kv: _shots_order(kv[0])))
        lines.append(f"- `{setting}`, fine-tuning − SK at each n (shots a class in brackets), in points: {per_n}")
    ranges = [f"{probe_label(m)} {span_points(d.values())} (over n = {', '.join(sorted(d, key=_shots_order))})"
              for m, d in means.items() if d]
    if ranges:
        lines.append(f"- `{setting}`, range of SK − probe over n, in points: " + "; ".join(ranges))
    few = [n for n in shots if n != ALL and int(n) <= FEW]
    basis = [c for c in family if any(c.name.startswith(f"SK − {probe_label(m)}, {_shots_label(records, setting, n)}")
                                      for m in ("linear", "finetune") for n in few)]
    if basis:
        lines.append(claim_line(f"(`{setting}`) " + CLAIM.format(shots=" and ".join(few)), basis))
    return lines


def _shots_label(records: list[dict], setting: str, n: str) -> str:
    if n == ALL:
        return f"all ({_per_class(records, setting, n)} a class)"
    return f"{n} shot{'s' if n != '1' else ''} a class"


def _per_class(records: list[dict], setting: str, n: str) -> str:
    vals = [row["metrics"].get("per_class") for rec in records for row in rec["rows"]
            if row["keys"]["setting"] == setting and str(row["keys"]["shots"]) == n]
    vals = [v for v in vals if v is not None]
    return f"{statistics.fmean(vals):.0f}" if vals else "?"


def make_figure(records: list[dict], path: Path) -> None:
    """Test accuracy against labelled examples per class, one panel per setting, mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc: dict[tuple, list[float]] = {}
    xpos: dict[tuple, float] = {}
    for rec in records:
        for row in rec["rows"]:
            k = row["keys"]
            key = (k["setting"], k["method"], str(k["shots"]))
            acc.setdefault(key, []).append(100 * row["metrics"]["test_acc"])
            xpos[key] = row["metrics"].get("per_class", float(k["shots"]) if k["shots"] != ALL else float("nan"))
    settings = sorted({k[0] for k in acc})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method in [m for m in _methods(records) if any(k[0] == setting and k[1] == m for k in acc)]:
            keys = sorted((k for k in acc if k[0] == setting and k[1] == method), key=lambda k: xpos[k])
            ys = [statistics.fmean(acc[k]) for k in keys]
            err = [statistics.stdev(acc[k]) if len(acc[k]) > 1 else 0.0 for k in keys]
            ax.errorbar([xpos[k] for k in keys], ys, yerr=err, marker="o", capsize=3, label=method,
                        linestyle="-" if method in NOT_TRAINED else "--")
        ticks = sorted({(xpos[k], k[2]) for k in acc if k[0] == setting})
        ax.set_xscale("log")
        ax.set_xticks([t[0] for t in ticks])
        ax.set_xticklabels([t[1] if t[1] != ALL else f"all\n({t[0]:.0f})" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled examples per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="solid: no training, dashed: trained", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
