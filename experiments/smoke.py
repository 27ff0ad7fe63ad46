"""Smoke experiment: SK and weighted k-NN on raw pixels of a small data set (default: digits).

Fast enough for tests and for trying sweeps and launchers. The probes are the overlay's (``probe``:
``sk`` and ``knn``, experiments/core/probes), each choosing its setting on the same validation split;
``summary`` has ``val_acc`` (the SK probe's validation accuracy) so that an Optuna sweep can maximise it
(configs/hparams_search/sk_optuna.yaml). The table and its comparisons: experiments/reports/smoke.py.
"""
from __future__ import annotations

from experiments.core.config import probe_options
from experiments.core.data import load_dataset, to_float, train_val_split
from experiments.core.probes import ProbeTask, holdout, row, run_probe

OBJECTIVES = ("val_acc",)  # the SK probe's validation accuracy: what +hparams_search=sk_optuna maximises


def run(cfg, ctx) -> dict:
    data = load_dataset(cfg.data)
    fit_idx, val_idx = train_val_split(len(data.y_train), float(cfg.exp.val_frac), ctx.generator())
    task = ProbeTask(to_float(data.x_train).flatten(1).to(ctx.device), data.y_train.to(ctx.device),
                     to_float(data.x_test).flatten(1).to(ctx.device), data.y_test.to(ctx.device), data.num_classes,
                     holdout(fit_idx, val_idx), refit=True, seed=ctx.seed, device=ctx.device)
    results = {name: run_probe(name, task, options) for name, options in probe_options(cfg).items()}
    rows = [row(name, r, {"data": data.name, "probe": name}) for name, r in results.items()]
    summary = {f"{name}_test_acc": r.test_acc for name, r in results.items()}
    if "sk" in results:
        summary["val_acc"] = results["sk"].val_acc
    ctx.log(summary)
    return {"rows": rows, "summary": summary}
