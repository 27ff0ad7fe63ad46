"""Smoke experiment: SK and weighted k-NN on raw pixels of a small data set (default: digits).

Fast enough for tests and for trying sweeps and launchers. ``summary`` has ``val_acc`` (the SK probe's
validation accuracy) so that an Optuna sweep can maximise it (configs/hparams_search/sk_optuna.yaml).
SK's setting comes from the ``sk`` group: chosen on the validation split from ``sk.grid`` (``sk.tune=true``)
or the fixed ``sk.k``, ``sk.kernel``, ``sk.lengthscale``, ``sk.ridge`` (``sk.tune=false``).
"""
from __future__ import annotations

from experiments.core.config import sk_options
from experiments.core.data import load_dataset, to_float, train_val_split
from experiments.core.probes import knn_probe, sk_probe

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
    rows = [{"keys": {"data": data.name, "probe": r.name}, "metrics": r.metrics(), "info": r.info()} for r in results]
    summary = {f"{r.name}_test_acc": r.test_acc for r in results}
    summary["val_acc"] = results[0].val_acc
    ctx.log(summary)
    return {"rows": rows, "summary": summary}
