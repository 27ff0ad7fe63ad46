"""Smoke experiment: SK and weighted k-NN on raw pixels of a small data set (default: digits).

Fast enough for tests and for trying sweeps and launchers. ``summary`` has ``val_acc`` (the SK probe's
validation accuracy) so that an Optuna sweep can maximise it (configs/hparams_search/sk_optuna.yaml).
"""
from __future__ import annotations

from experiments.core.data import load_dataset, to_float
from experiments.core.probes import knn_probe, sk_probe, split_fit_val


def run(cfg, ctx) -> dict:
    data = load_dataset(cfg.data)
    x_train = to_float(data.x_train).flatten(1).to(ctx.device)
    x_test = to_float(data.x_test).flatten(1).to(ctx.device)
    y_train, y_test = data.y_train.to(ctx.device), data.y_test.to(ctx.device)
    fit_idx, val_idx = split_fit_val(len(y_train), float(cfg.exp.val_frac), ctx.generator())
    results = [
        sk_probe(x_train, y_train, x_test, y_test, data.num_classes, cfg.sk, fit_idx.to(ctx.device), val_idx.to(ctx.device)),
        knn_probe(x_train, y_train, x_test, y_test, data.num_classes),
    ]
    rows = [{"keys": {"data": data.name, "probe": r.name}, "metrics": r.metrics(), "info": r.info()} for r in results]
    summary = {f"{r.name}_test_acc": r.test_acc for r in results}
    summary["val_acc"] = results[0].val_acc
    ctx.log(summary)
    return {"rows": rows, "summary": summary}
