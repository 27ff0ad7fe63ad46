"""The linear probe: multinomial logistic regression on standardised features (Ericsson et al., 2021).

Objective: scikit-learn's ``C * sum(loss) + ||W||^2 / 2`` (bias unpenalised), minimised by L-BFGS. The
inverse strength C is chosen by the task's selection rule over ``grid.C`` (each fold fits the whole C path
from strong to weak regularisation, warm-started), or ``default.C``; then the chosen C is fitted on the
final support. Features are standardised with the statistics of the examples a model is fitted on.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from experiments.core.probes.protocol import ProbeResult, ProbeTask, accuracy, choose, correct, elapsed
from experiments.core.probes.registry import register


def standardize(x_fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = x_fit.mean(0, keepdim=True), x_fit.std(0, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
    return [(t - mean) / std for t in (x_fit, *others)]


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, init=None, max_iter: int = 200):
    """(W, b) of multinomial logistic regression, sklearn's objective C·Σ loss + ½‖W‖², by L-BFGS."""
    n, d = x.shape
    w = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")
    reg = 1.0 / (2.0 * C * n)  # sklearn's objective divided by C·n: mean loss + ‖W‖²/(2Cn)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


@register("linear", label="linear", trained=True)
def linear_probe(task: ProbeTask, *, grid: dict | None, default: dict, max_iter: int = 200) -> ProbeResult:
    """Logistic regression: C chosen by the task's rule, then fitted on the final support."""
    x, y = task.x.float(), task.y.long()

    def score_fold(fit, val, settings):
        x_fit, x_val = standardize(x[fit], x[val])
        params, out = None, {}
        for C in sorted({float(s["C"]) for s in settings}):  # strong to weak regularisation, warm-started
            params = fit_logreg(x_fit, y[fit], task.num_classes, C, init=params, max_iter=max_iter)
            out[C] = correct((x_val @ params[0] + params[1]).argmax(1), y[val])
        return [out[float(s["C"])] for s in settings]

    choice = choose(task, grid, default, score_fold)
    t0 = time.perf_counter()
    pos, _, _ = task.support()
    x_sup, x_test = standardize(x[pos], task.test_x.float())
    w, b = fit_logreg(x_sup, y[pos], task.num_classes, float(choice.setting["C"]), max_iter=max_iter)
    fit_s = elapsed(t0, w)
    t0 = time.perf_counter()
    pred = (x_test @ w + b).argmax(1)
    return ProbeResult("linear", accuracy(pred, task.test_y), choice.val_acc, choice.select_s + fit_s,
                       elapsed(t0, pred), {"C": float(choice.setting["C"])}, pred, choice.select_s, choice.tried,
                       choice.scores, choice.selection, choice.edges)
