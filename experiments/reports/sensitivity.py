"""The sensitivity figure of SK's selection grid, drawn beside any table whose rows carry ``sk_grid``.

A row that reports SK on one feature set may carry ``row["sk_grid"]``: SK's selection score at every setting
of its grid (``{"k", "kernel", "lengthscale_mult", "ridge", "val_acc"}``). ``scripts/make_tables.py`` draws
``results/<name>_sensitivity.png`` from them (``draw_sensitivity``) with a caption (``sensitivity_caption``).
"""
from __future__ import annotations

import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

SENSITIVITY_MAX_ROWS = 12  # feature sets drawn in one sensitivity figure (evenly spaced beyond that)


def sensitivity_data(records: list[dict]) -> dict[tuple, dict[tuple, list[float]]]:
    """{row keys: {(kernel, k, line value, ridge): [val_acc of each record]}} of the rows with ``sk_grid``.

    The line value is the entry's ``lengthscale_mult`` (or its ``lengthscale`` when the grid gives no
    multiple, or None).
    """
    out: dict[tuple, dict[tuple, list[float]]] = {}
    for rec in records:
        for row in rec.get("rows", []):
            grid = row.get("sk_grid")
            if not grid:
                continue
            cells = out.setdefault(tuple(row["keys"].items()), defaultdict(list))
            for e in grid:
                line = e.get("lengthscale_mult", e.get("lengthscale"))
                cells[(str(e["kernel"]), int(e["k"]), None if line is None else float(line),
                       float(e.get("ridge", float("nan"))))].append(float(e["val_acc"]))
    return out


def sensitivity_curves(data: dict[tuple, dict[tuple, list[float]]]) -> dict[tuple, dict[str, dict[Any, list[tuple[int, float]]]]]:
    """{row keys: {kernel: {line value: [(k, accuracy), ...] by k}}}: each point the mean over records
    (seeds) of a setting's validation accuracy, then the best over ridge."""
    out: dict = {}
    for rk, cells in data.items():
        best: dict[tuple, float] = {}
        for (kern, k, line, _ridge), vals in cells.items():
            m = statistics.fmean(vals)
            best[(kern, line, k)] = max(best.get((kern, line, k), -math.inf), m)
        per: dict = defaultdict(lambda: defaultdict(list))
        for (kern, line, k), acc in sorted(best.items(), key=lambda kv: kv[0][2]):
            per[kern][line].append((k, acc))
        out[rk] = {kern: dict(lines) for kern, lines in per.items()}
    return out


def _sensitivity_layout(records: list[dict]):
    """(data, feature sets drawn, all feature sets, kernels, line values, ridges, ks, seeds)."""
    data = sensitivity_data(records)
    rows = list(data)
    shown = rows
    if len(rows) > SENSITIVITY_MAX_ROWS:
        step = (len(rows) - 1) / (SENSITIVITY_MAX_ROWS - 1)
        shown = [rows[round(i * step)] for i in range(SENSITIVITY_MAX_ROWS)]
    cells = [c for r in shown for c in data[r]]
    kernels = sorted({c[0] for c in cells})
    lines = sorted({c[2] for c in cells}, key=lambda v: (v is None, v or 0.0))
    ridges = sorted({c[3] for c in cells})
    ks = sorted({c[1] for c in cells})
    seeds = len({r.get("seed") for r in records})
    return data, shown, rows, kernels, lines, ridges, ks, seeds


def sensitivity_caption(records: list[dict]) -> str:
    """The Markdown sentence under the sensitivity figure of ``records``."""
    _, shown, rows, _, _, ridges, _, n = _sensitivity_layout(records)
    ridge_txt = ", ".join(f"{r:g}" for r in ridges)
    caption = (f"SK's validation accuracy over its whole selection grid: one panel per kernel, k on the x axis, "
               f"one line per lengthscale multiple, each point the mean over {n} seed{'s' if n != 1 else ''} "
               f"of the best ridge in {{{ridge_txt}}}; ★ marks the best setting.")
    if len(shown) < len(rows):
        caption += f" {len(shown)} of the {len(rows)} feature sets drawn (evenly spaced)."
    return caption


def draw_sensitivity(records: list[dict], path: Path) -> None:
    """Draw SK's validation accuracy over its selection grid.

    One row of panels per feature set (a table row carrying ``sk_grid``), one panel per kernel; x: k
    (log scale), one line per lengthscale multiple; y: validation accuracy, mean over the records (seeds)
    of each setting, then the best over ridge. A star marks the best setting of each feature set.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, shown, _, kernels, lines, ridges, ks, n = _sensitivity_layout(records)
    curves = sensitivity_curves(data)
    varying = [k for k, _ in shown[0] if len({dict(rk).get(k) for rk in shown}) > 1] or [k for k, _ in shown[0]]
    cmap = plt.get_cmap("viridis")
    colours = {v: cmap(i / max(1, len(lines) - 1) * 0.9) for i, v in enumerate(lines)}
    fig, axes = plt.subplots(len(shown), len(kernels), figsize=(3.2 * len(kernels) + 1.4, 2.3 * len(shown) + 0.8),
                             squeeze=False, sharex=True, sharey="row")
    for i, rk in enumerate(shown):
        best_kernel, best_k, best_acc = max(((kern, k, acc) for kern, per_line in curves[rk].items()
                                             for pts in per_line.values() for k, acc in pts), key=lambda t: t[2])
        for j, kern in enumerate(kernels):
            ax = axes[i, j]
            for line in lines:
                pts = curves[rk].get(kern, {}).get(line)
                if pts:
                    ax.plot([k for k, _ in pts], [100 * a for _, a in pts], marker="o", ms=3, color=colours[line],
                            label="–" if line is None else f"{line:g}")
            if best_kernel == kern:
                ax.plot([best_k], [100 * best_acc], marker="*", ms=12, color="black", ls="none")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"kernel {kern}", fontsize=9)
            if i == len(shown) - 1:
                ax.set_xlabel("k (neighbours)")
            if j == 0:
                ax.set_ylabel("val acc (%)", fontsize=8)
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    handles = [legend[label] for label in sorted(legend, key=lambda s: (s == "–", float(s) if s != "–" else 0.0))]
    multiples = any("lengthscale_mult" in e for rec in records for row in rec.get("rows", []) for e in row.get("sk_grid") or [])
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], title="lengthscale\n× auto" if multiples else "lengthscale",
                   loc="center right", fontsize=8, title_fontsize=8)
    ridge_txt = ", ".join(f"{r:g}" for r in ridges)
    title = (f"SK validation accuracy over its selection grid (mean over {n} seed{'s' if n != 1 else ''}, "
             f"best over ridge in {{{ridge_txt}}}; star: best setting)")
    fig.suptitle(textwrap.fill(title, width=int(14 * fig.get_figwidth())), fontsize=9)  # a narrow figure wraps it
    fig.tight_layout(rect=(0, 0, 0.86 if handles else 1, 0.97))
    if len(shown) > 1:
        # Each feature set names its row in a line above it (a rotated y label that long overlaps the
        # next row): room between the rows, then the text at the row's top-left corner.
        fig.subplots_adjust(hspace=0.55)
        for i, rk in enumerate(shown):
            box = axes[i, 0].get_position()
            label = ", ".join(f"{k}={v}" if k != "setting" else str(v) for k, v in rk if k in varying)
            fig.text(box.x0, box.y1 + (0.004 if i else 0.05), label, ha="left", va="bottom", fontsize=8,
                     fontweight="bold")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
