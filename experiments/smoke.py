"""Smoke experiment: SK and weighted k-NN on raw pixels of a small data set (default: digits).

Fast enough for tests and for trying sweeps and launchers. ``summary`` has ``val_acc`` (the SK probe's
validation accuracy) so that an Optuna sweep can maximise it (configs/hparams_search/sk_optuna.yaml).
SK's setting comes from the ``sk`` group: chosen on the validation split from ``sk.grid`` (``sk.tune=true``)
or the fixed ``sk.k``, ``sk.kernel``, ``sk.lengthscale``, ``sk.ridge`` (``sk.tune=false``). Each row reports
its selection cost (``select_s``, ``settings_tried``; k-NN's setting is fixed) and the SK row its score at
every grid setting (``sk_grid``, drawn beside the table); ``comparisons`` writes SK − k-NN under it.
"""
from __future__ import annotations

import math
import statistics

from experiments.core.config import sk_options
from experiments.core.data import load_dataset, to_float, train_val_split
from experiments.core.probes import knn_probe, paired_ci, sk_probe

OBJECTIVES = ("val_acc",)  # the SK probe's validation accuracy: what +hparams_search=sk_optuna maximises


def run(cfg, ctx) -> dict:
    data = load_dataset(cfg.data)
    x_train = to_float(data.x_train).flatten(1).to(ctx.device)
    x_test = to_float(data.x_test).flatten(1).to(ctx.device)
    y_train, y_test = data.y_train.to(ctx.device), data.y_test.to(ctx.device)
    fit_idx, val_idx = train_val_split(len(y_train), float(cfg.exp.val_frac), ctx.generator())
    results = [
        sk_probe(x_train, y_train, x_test, y_test, data.num_classes, fit_idx=fit_idx.to(ctx.device),
                 val_idx=val_idx.to(ctx.device), **sk_options(cfg.sk)),
        knn_probe(x_train, y_train, x_test, y_test, data.num_classes),
    ]
    rows = [r.row({"data": data.name, "probe": r.name}) for r in results]
    summary = {f"{r.name}_test_acc": r.test_acc for r in results}
    summary["val_acc"] = results[0].val_acc
    ctx.log(summary)
    return {"rows": rows, "summary": summary}


def comparisons(records: list[dict]) -> list[str]:
    """Each probe's test accuracy (mean ± std over seeds, as in the table) and SK − k-NN in points, paired
    over seeds (the same split) with a 95% percentile bootstrap CI."""
    acc: dict[str, dict] = {}
    for rec in records:
        for row in rec["rows"]:
            acc.setdefault(row["keys"]["probe"], {})[rec.get("seed")] = float(row["metrics"]["test_acc"])
    if not acc:
        return []
    n = len({rec.get("seed") for rec in records})

    def pct(values):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):.2f} ± {100 * std:.2f}"

    def points(v):
        return f"{100 * v:+.2f}".replace("-", "−")

    lines = [f"- Test accuracy (%, mean ± std over {n} seed{'s' if n != 1 else ''}): "
             + "; ".join(f"{p} {pct(list(v.values()))}" for p, v in acc.items())]
    if "sk" in acc and "knn" in acc:
        seeds = sorted(set(acc["sk"]) & set(acc["knn"]), key=str)
        mean, lo, hi = paired_ci([acc["sk"][s] - acc["knn"][s] for s in seeds])
        ci = f" [{points(lo)}, {points(hi)}] (95% percentile bootstrap CI over seeds)" if math.isfinite(lo) else " (one seed: no CI)"
        lines.append(f"- sk − knn, paired over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}, in points: {points(mean)}{ci}")
    return lines
