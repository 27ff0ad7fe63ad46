"""Probes with nothing trained besides SK: DINO's weighted k-NN vote and the nearest class mean.

- ``knn``: features L2-normalised; the k most cosine-similar support points vote for their label with
  weight exp(s / T) (Caron et al., 2021: k = 20, T = 0.07, the ``default``). (k, T) is chosen by the task's
  selection rule over ``grid`` like every other probe's setting, from one neighbour search per fold.
- ``ncm``: nearest class mean of L2-normalised features (no setting).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import sk
from experiments.core.probes.protocol import ProbeResult, ProbeTask, accuracy, choose, correct, elapsed
from experiments.core.probes.registry import register


def neighbours(z: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (M, k') and indices (M, k') of the k' = min(k, N) most similar support points
    of unit vectors z among unit vectors x, most similar first."""
    with torch.no_grad():
        _, idx = sk.knn_search(z, x, k)
        sims = torch.bmm(x[idx], z.unsqueeze(2)).squeeze(2)
    return sims, idx


def vote(sims: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, num_classes: int) -> torch.Tensor:
    """Predicted labels: the first k neighbours (similarities ``sims``, labels ``labels``, both (M, k'))
    vote with weight exp(s / T)."""
    w = torch.exp(sims[:, :k] / temperature)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=w.dtype, device=w.device)
    return scores.scatter_add_(1, labels[:, :k], w).argmax(1)


@register("knn", label="k-NN", trained=False)
def knn_probe(task: ProbeTask, *, grid: dict | None, default: dict) -> ProbeResult:
    """DINO's weighted k-NN vote: (k, T) chosen by the task's rule, support the final support."""
    x, y = F.normalize(task.x.float(), dim=1), task.y.long()

    def score_fold(fit, val, settings):
        sims, idx = neighbours(x[val], x[fit], max(int(s["k"]) for s in settings))
        labels = y[fit][idx]
        return [correct(vote(sims, labels, int(s["k"]), float(s["temperature"]), task.num_classes), y[val])
                for s in settings]

    choice = choose(task, grid, default, score_fold)
    pos, _, _ = task.support()
    k, temperature = int(choice.setting["k"]), float(choice.setting["temperature"])
    t0 = time.perf_counter()
    sims, idx = neighbours(F.normalize(task.test_x.float(), dim=1), x[pos], k)
    pred = vote(sims, y[pos][idx], k, temperature, task.num_classes)
    return ProbeResult("knn", accuracy(pred, task.test_y), choice.val_acc, choice.select_s, elapsed(t0, pred),
                       {"k": min(k, len(pos)), "T": temperature}, pred, choice.select_s, choice.tried, choice.scores,
                       choice.selection, choice.edges)


@register("ncm", label="NCM", trained=False)
def ncm_probe(task: ProbeTask) -> ProbeResult:
    """Nearest class mean on L2-normalised features (nothing to choose)."""
    t0 = time.perf_counter()
    _, x, y = task.support()
    x = F.normalize(x.float(), dim=1)
    means = torch.zeros(task.num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y.long(), x)
    counts = torch.bincount(y.long(), minlength=task.num_classes).clamp_min(1).unsqueeze(1)
    means = F.normalize(means / counts, dim=1)
    fit_s = elapsed(t0, means)
    t0 = time.perf_counter()
    pred = (F.normalize(task.test_x.float(), dim=1) @ means.T).argmax(dim=1)
    return ProbeResult("ncm", accuracy(pred, task.test_y), None, fit_s, elapsed(t0, pred), {}, pred)
