"""The fine-tuning probe: the backbone's last block and a new linear classifier, trained on the labels.

It needs more than features: ``task.extras`` holds the cached activations that enter the last block
(``act`` for the labelled set, ``test_act`` for the test set) and ``make_tail()``, a fresh trainable copy
of the last block with its pooling (backbones with ``split_last_block``). Adam at a constant learning
rate, one random batch of ``batch_size`` examples a step (all of them when fewer); the model stays in eval
mode (the pretrained batch-norm statistics stay: few-shot batches are tiny). (learning rate, steps) is
chosen by the task's selection rule over ``grid`` — one run per learning rate and fold, scored at every
step count of the grid along the run — or ``default``; then the chosen setting is trained on the final
support.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from experiments.core.probes.protocol import ProbeResult, ProbeTask, accuracy, choose, correct
from experiments.core.probes.registry import register


def finetune_runs(act: torch.Tensor, y: torch.Tensor, make_tail: Callable[[], nn.Module], num_classes: int,
                  feature_dim: int, *, lr: float, checkpoints: list[int], batch_size: int, weight_decay: float,
                  seed: int, device) -> Iterator[tuple[int, nn.Module]]:
    """One run of a fresh tail and a new linear classifier on activations ``act`` (N, ...): yields
    ``(steps, model)`` after each step count of ``checkpoints`` (ascending); ``model`` maps activations to
    logits. ``seed`` fixes the classifier's initialisation and the batches."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tail = make_tail().to(device)
        head = nn.Linear(feature_dim, num_classes).to(device)
    model = nn.Sequential(tail, head).eval()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    bs, y_dev, done = min(batch_size, len(y)), y.to(device), 0
    for target in sorted(int(c) for c in checkpoints):
        for _ in range(target - done):
            idx = torch.randperm(len(y), generator=g)[:bs]
            loss = F.cross_entropy(model(act[idx].to(device).float()), y_dev[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        done = max(done, target)
        yield target, model


@torch.no_grad()
def finetune_predict(model: nn.Module, act: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (N,) on the CPU of cached activations ``act``."""
    preds = [model(act[s:s + batch_size].to(device).float()).argmax(1).cpu() for s in range(0, len(act), batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


@register("finetune", label="fine-tuning", trained=True)
def finetune_probe(task: ProbeTask, *, grid: dict | None, default: dict, batch_size: int = 64,
                   weight_decay: float = 0.0) -> ProbeResult | None:
    """Fine-tune the last block + a linear classifier; None when the backbone offers no last block."""
    act, test_act, make_tail = (task.extras.get(k) for k in ("act", "test_act", "make_tail"))
    if act is None or test_act is None or make_tail is None:
        return None
    device = task.device
    y = task.y.cpu()

    def runs(positions, lr, checkpoints):
        return finetune_runs(act[positions.cpu()], y[positions.cpu()], make_tail, task.num_classes,
                             int(task.x.shape[1]), lr=lr, checkpoints=checkpoints, batch_size=batch_size,
                             weight_decay=weight_decay, seed=task.seed, device=device)

    def score_fold(fit, val, settings):
        out: dict[tuple[float, int], int] = {}
        for lr in dict.fromkeys(float(s["lr"]) for s in settings):
            steps = sorted({int(s["steps"]) for s in settings if float(s["lr"]) == lr})
            for n, model in runs(fit, lr, steps):
                out[(lr, n)] = correct(finetune_predict(model, act[val.cpu()], device), y[val.cpu()])
        return [out[(float(s["lr"]), int(s["steps"]))] for s in settings]

    choice = choose(task, grid, default, score_fold)
    lr, steps = float(choice.setting["lr"]), int(choice.setting["steps"])
    t0 = time.perf_counter()
    pos, _, _ = task.support()
    (_, model), = list(runs(pos, lr, [steps]))
    _sync(device)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = finetune_predict(model, test_act, device)
    chosen: dict[str, Any] = {"lr": lr, "steps": steps}
    return ProbeResult("finetune", accuracy(pred, task.test_y), choice.val_acc, choice.select_s + fit_s,
                       time.perf_counter() - t0, chosen, pred, choice.select_s, choice.tried, choice.scores,
                       choice.selection, choice.edges)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":  # the optimiser's last step is queued, not done
        torch.cuda.synchronize(device)
