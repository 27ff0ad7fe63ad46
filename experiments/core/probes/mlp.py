"""The MLP probe: a one-hidden-layer ReLU network trained with Adam on fixed features.

Its learning rate and weight decay are chosen by the task's selection rule over ``grid`` (every setting
trained from the same initial weights on the same batches), or ``default``; the width and the budget are
fixed (``hidden``, ``epochs``, ``batch_size``): the width sets the head's size that tables compare.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from experiments.core.probes.protocol import ProbeResult, ProbeTask, accuracy, choose, correct, elapsed
from experiments.core.probes.registry import register
from experiments.core.train import count_params, train_classifier


def train_mlp(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, hidden: int, epochs: int, batch_size: int,
              lr: float, weight_decay: float, seed: int, device, progress=None) -> tuple[nn.Module, list[dict]]:
    """(mlp in eval mode, training history) of one setting; the initial weights and the batch order depend on
    ``seed`` only."""
    torch.manual_seed(seed + 3)
    mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    hist = train_classifier(nn.Identity(), mlp, x, y, epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                            optimizer="adam", weight_decay=weight_decay,
                            generator=torch.Generator().manual_seed(seed + 4), progress=progress,
                            desc=f"mlp probe, lr={lr:g}, wd={weight_decay:g}")
    return mlp.eval(), hist


@register("mlp", label="MLP", trained=True)
def mlp_probe(task: ProbeTask, *, grid: dict | None, default: dict, hidden: int = 256, epochs: int = 20,
              batch_size: int = 256) -> ProbeResult:
    """MLP head on the task's features: (lr, weight_decay) chosen by the task's rule, then trained on the final
    support."""
    x, y = task.x.float(), task.y.long()
    budget = dict(hidden=hidden, epochs=epochs, batch_size=batch_size, seed=task.seed, device=task.device,
                  progress=task.extras.get("progress"))

    def score_fold(fit, val, settings):
        out = []
        for s in settings:
            mlp, _ = train_mlp(x[fit], y[fit], task.num_classes, lr=float(s["lr"]),
                               weight_decay=float(s["weight_decay"]), **budget)
            with torch.no_grad():
                out.append(correct(mlp(x[val]).argmax(1), y[val]))
        return out

    choice = choose(task, grid, default, score_fold)
    pos, _, _ = task.support()
    mlp, hist = train_mlp(x[pos], y[pos], task.num_classes, lr=float(choice.setting["lr"]),
                          weight_decay=float(choice.setting["weight_decay"]), **budget)
    train_s = hist[-1]["train_s"] if hist else 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = mlp(task.test_x.float()).argmax(1)
    chosen = {"lr": float(choice.setting["lr"]), "weight_decay": float(choice.setting["weight_decay"])}
    more = {"head_params": float(count_params(mlp)), "train_epochs": float(epochs), "train_s": float(train_s)}
    return ProbeResult("mlp", accuracy(pred, task.test_y), choice.val_acc, choice.select_s + train_s,
                       elapsed(t0, pred), chosen, pred, choice.select_s, choice.tried, choice.scores,
                       choice.selection, choice.edges, more)
