"""The SK probe: the SK classifier on fixed features, nothing trained.

The support is the labelled features with their integer labels (``sk.sparse_krr``'s label path); the
prediction is the best class score. Its setting is (k, kernel, lengthscale, ridge), the lengthscale a
multiple of ``sk.auto_lengthscale`` of the support (``lengthscale_mult``), chosen by the task's selection
rule over the ``sk`` group's grid (``sk.grid``) with one neighbour search per fold for the whole grid
(``sk.sparse_krr(..., indices=)``); the fixed setting (``sk.k``, ``sk.kernel``, ``sk.lengthscale``,
``sk.ridge``) where nothing is chosen (``sk.tune=false``, or rule ``none``).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

import sk
from experiments.core.probes.protocol import ProbeResult, ProbeTask, accuracy, choose, correct, elapsed
from experiments.core.probes.registry import register


def resolve_lengthscale(setting: dict[str, Any], support: torch.Tensor, k: int) -> float:
    """The absolute lengthscale of ``setting`` on ``support``: ``lengthscale_mult`` x auto, ``"auto"``, or a
    number."""
    if "lengthscale_mult" in setting:
        return float(setting["lengthscale_mult"]) * float(sk.auto_lengthscale(support, k=k))
    value = setting.get("lengthscale", "auto")
    return float(sk.auto_lengthscale(support, k=k)) if str(value) == "auto" else float(value)


def sk_predict(z, x, y, num_classes: int, setting: dict[str, Any], backend: str = "torch",
               indices: torch.Tensor | None = None, lengthscale: float | None = None) -> torch.Tensor:
    """Predicted labels of ``z`` from the support (x, integer labels y) at ``setting``."""
    k = min(int(setting["k"]), len(x))
    ls = resolve_lengthscale(setting, x, k) if lengthscale is None else lengthscale
    with torch.no_grad():
        scores = sk.sparse_krr(z, x, y.long(), k=k, kernel=str(setting["kernel"]), lengthscale=ls,
                               ridge=float(setting["ridge"]), backend=backend, indices=indices,
                               num_classes=num_classes)
    return scores.argmax(dim=1)


def score_grid(x_fit, y_fit, x_val, y_val, num_classes: int, settings: list[dict], backend: str = "torch") -> list[int]:
    """Correct validation predictions of every setting, from one neighbour search (k up to the grid's largest,
    capped at the fit size) and one auto lengthscale per k."""
    k_max = min(max(int(s["k"]) for s in settings), len(x_fit))
    with torch.no_grad():
        _, idx = sk.knn_search(x_val, x_fit, k_max, backend=backend)
    auto: dict[int, float] = {}
    out = []
    for s in settings:
        k = min(int(s["k"]), k_max)
        if k not in auto:
            auto[k] = float(sk.auto_lengthscale(x_fit, k=k))
        ls = float(s.get("lengthscale_mult", 1.0)) * auto[k]
        out.append(correct(sk_predict(x_val, x_fit, y_fit, num_classes, s, backend, idx, lengthscale=ls), y_val))
    return out


@register("sk", label="SK", trained=False, grid_field="sk_grid")
def sk_probe(task: ProbeTask, *, grid: dict | None, default: dict, normalize: bool = True,
             backend: str = "torch") -> ProbeResult:
    """SK on the task: setting chosen by the task's rule over ``grid`` (or ``default``), then the test set read
    out from the final support (``task.support()``). ``normalize``: L2-normalise the features first."""
    prep = (lambda t: F.normalize(t.float(), dim=1)) if normalize else (lambda t: t.float())
    x, y = prep(task.x), task.y

    def score_fold(fit, val, settings):
        return score_grid(x[fit], y[fit], x[val], y[val], task.num_classes, settings, backend)

    choice = choose(task, grid, default, score_fold)
    pos, _, y_sup = task.support()
    x_sup = x[pos]
    k = min(int(choice.setting["k"]), len(x_sup))
    ls = resolve_lengthscale(choice.setting, x_sup, k)
    t0 = time.perf_counter()
    pred = sk_predict(prep(task.test_x), x_sup, y_sup, task.num_classes, choice.setting, backend, lengthscale=ls)
    predict_s = elapsed(t0, pred)
    chosen = {**choice.setting, "k": k, "lengthscale": ls}
    return ProbeResult("sk", accuracy(pred, task.test_y), choice.val_acc, choice.select_s, predict_s, chosen, pred,
                       choice.select_s, choice.tried, _grid_scores(choice.scores), choice.selection, choice.edges)


def _grid_scores(scores: list[dict] | None) -> list[dict] | None:
    """The sensitivity figure's fields (``k``, ``kernel``, ``lengthscale_mult``, ``ridge``, ``val_acc``)."""
    if scores is None:
        return None
    return [{"k": int(s["k"]), "kernel": str(s["kernel"]), "lengthscale_mult": float(s.get("lengthscale_mult", 1.0)),
             "ridge": float(s["ridge"]), "val_acc": float(s["val_acc"])} for s in scores]
