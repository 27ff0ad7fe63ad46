"""Readouts on fixed features, shared by the experiments so that every probe sees the same data.

Every function here takes tensors and plain keyword arguments, never a config node: the experiment
turns ``cfg.sk`` into keyword arguments once (``experiments.core.config.sk_options``).

Each probe takes labelled features (``train``, split further into fit/validation where it tunes
something) and test features, and returns a ``ProbeResult`` with test accuracy, the validation score
that chose its hyperparameters, and its fit and predict seconds.

- ``sk_probe``: the SK classifier (no training). k, kernel, lengthscale (a multiple of
  ``sk.auto_lengthscale``) and ridge are picked from a grid on the validation split with one shared
  neighbour search (``tune_sk``), or taken as given (the fixed setting). The final support is all
  labelled examples (``refit=False``: the fit part only).
- ``knn_probe``: DINO's weighted k-NN vote (L2-normalised, cosine, k=20, T=0.07).
- ``linear_probe``: multinomial logistic regression, L2 strength C swept over a log grid on the
  validation split (Ericsson et al., 2021), then refitted on all labelled examples.
- ``ncm_probe``: nearest class mean of L2-normalised features.
- ``paired_ci``: a paired difference over seeds with its bootstrap CI, for the tables' comparisons.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import sk

DEFAULT_C_GRID = [10.0 ** e for e in range(-6, 6)]  # 1e-6 ... 1e5


@dataclass
class ProbeResult:
    name: str
    test_acc: float
    val_acc: float | None
    fit_s: float
    predict_s: float
    chosen: dict[str, Any] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    select_s: float = 0.0            # seconds spent choosing hyperparameters on validation (0: a fixed setting)
    settings_tried: int = 1          # settings evaluated to choose them (1: a fixed setting)
    grid: list[dict[str, Any]] | None = None  # SK: the validation score of every grid setting (tune_sk's scores)

    def metrics(self) -> dict[str, float]:
        out = {"test_acc": self.test_acc, "fit_s": self.fit_s, "predict_s": self.predict_s,
               "select_s": self.select_s, "settings_tried": self.settings_tried}
        if self.val_acc is not None:
            out["val_acc"] = self.val_acc
        return out

    def row(self, keys: dict[str, Any], info: dict[str, str] | None = None) -> dict[str, Any]:
        """A table row (``{"keys", "metrics", "info"}``, plus ``sk_grid`` when a grid was scored)."""
        out = {"keys": keys, "metrics": self.metrics(), "info": {**self.info(), **(info or {})}}
        if self.grid is not None:
            out["sk_grid"] = self.grid
        return out

    def info(self) -> dict[str, str]:
        return {"chosen": ", ".join(f"{k}={_fmt(v)}" for k, v in self.chosen.items())} if self.chosen else {}


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.cpu() == y.cpu()).float().mean())


def _prep(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=1) if normalize else x


def sk_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             num_classes: int, *, k: int = 32, kernel: str = "gaussian", lengthscale: float | str = "auto",
             ridge: float = 1e-3, grid: dict[str, list] | None = None, fit_idx: torch.Tensor | None = None,
             val_idx: torch.Tensor | None = None, refit: bool = True, normalize: bool = True,
             backend: str = "torch") -> ProbeResult:
    """SK classifier on fixed features (one-hot targets, argmax of the scores).

    Args:
        train_x, train_y: the labelled examples; test_x, test_y: what is read out.
        k, kernel, lengthscale, ridge: the fixed setting, used when ``grid`` is None (``lengthscale="auto"``:
            ``sk.auto_lengthscale`` of the support).
        grid: ``{"k", "kernel", "lengthscale_mult", "ridge"}`` lists: the setting is chosen on the
            validation split instead (``tune_sk``: support ``train[fit_idx]``, scored on ``train[val_idx]``).
        fit_idx, val_idx: the validation split; with the fixed setting it only reports ``val_acc``.
        refit: the support of the test predictions: every labelled example (True) or the fit part only.
        normalize: L2-normalise the features first; backend: the neighbour search (``sk.knn_search``).

    ``fit_s`` is the selection time (SK fits nothing); ``chosen`` the setting used.
    """
    x_all = _prep(train_x.float(), normalize)
    z_test = _prep(test_x.float(), normalize)
    has_val = fit_idx is not None and val_idx is not None
    t0 = time.perf_counter()
    val_acc, scores = None, None
    if grid is not None:
        if not has_val:
            raise ValueError("sk_probe with a grid needs fit_idx and val_idx (a validation split)")
        scores = []
        chosen, val_acc = tune_sk(x_all[fit_idx], train_y[fit_idx], x_all[val_idx], train_y[val_idx],
                                  num_classes, backend=backend, scores=scores, **grid)
    else:
        support = x_all if refit or not has_val else x_all[fit_idx]
        ls = float(sk.auto_lengthscale(support, k=int(k))) if lengthscale == "auto" else float(lengthscale)
        chosen = {"k": int(k), "kernel": str(kernel), "lengthscale": ls, "ridge": float(ridge)}
        if has_val:
            val_acc = accuracy(_sk_predict(x_all[fit_idx], train_y[fit_idx], x_all[val_idx], num_classes,
                                           chosen, backend), train_y[val_idx])
    fit_s = time.perf_counter() - t0
    if not refit and has_val:
        x_all, train_y = x_all[fit_idx], train_y[fit_idx]
    t0 = time.perf_counter()
    pred = _sk_predict(x_all, train_y, z_test, num_classes, chosen, backend)
    predict_s = _elapsed(t0, pred)
    return ProbeResult("sk", accuracy(pred, test_y), val_acc, fit_s, predict_s, chosen, pred,
                       select_s=fit_s if scores is not None else 0.0,
                       settings_tried=len(scores) if scores is not None else 1, grid=scores)


def _elapsed(t0: float, result: torch.Tensor) -> float:
    """Seconds since ``t0`` once ``result`` is computed: CUDA work is asynchronous, so synchronise first."""
    if result.device.type == "cuda":
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - t0


def _sk_predict(x, y, z, num_classes, chosen, backend="torch", indices=None) -> torch.Tensor:
    targets = F.one_hot(y.long(), num_classes).to(x.dtype)
    with torch.no_grad():
        scores = sk.sparse_krr(z, x, targets, k=chosen["k"], kernel=chosen["kernel"],
                               lengthscale=chosen["lengthscale"], ridge=chosen["ridge"], backend=backend,
                               indices=indices)
    return scores.argmax(dim=1)


def tune_sk(x_fit, y_fit, x_val, y_val, num_classes, *, k: list[int], kernel: list[str],
            lengthscale_mult: list[float], ridge: list[float], backend: str = "torch",
            indices: torch.Tensor | None = None, scores: list | None = None) -> tuple[dict[str, Any], float]:
    """Grid search of (k, kernel, lengthscale multiple, ridge): SK from ``x_fit`` scored on ``x_val``.

    One neighbour search serves the whole grid (``sk.sparse_krr(..., indices=)``). ``indices``: the
    neighbours of each validation point among ``x_fit``, sorted by distance (default: ``sk.knn_search``
    with max(k) neighbours); a leave-one-out passes each point's neighbours with the point itself
    removed, and then k is capped at their number. The lengthscale tried is
    ``mult * sk.auto_lengthscale(x_fit, k)``; ties go to the first setting in grid order (k ascending,
    then kernel, multiple, ridge as given). Returns (setting, validation accuracy). ``scores``: a list
    that receives every setting's ``{"k", "kernel", "lengthscale_mult", "lengthscale", "ridge", "val_acc"}``
    (the sensitivity of the choice; ``scripts/make_tables.py`` draws it).
    """
    ks = sorted(int(v) for v in k)
    if indices is None:
        with torch.no_grad():
            _, indices = sk.knn_search(x_val, x_fit, min(ks[-1], len(x_fit)), backend=backend)
    k_max = min(ks[-1], indices.shape[1])
    best, best_acc = None, -1.0
    for k_try in ks:
        k_eff = min(k_try, k_max)
        auto = float(sk.auto_lengthscale(x_fit, k=k_eff))
        for kern, mult, lam in itertools.product(kernel, lengthscale_mult, ridge):
            chosen = {"k": k_eff, "kernel": str(kern), "lengthscale": auto * float(mult), "ridge": float(lam)}
            acc = accuracy(_sk_predict(x_fit, y_fit, x_val, num_classes, chosen, backend, indices=indices), y_val)
            if scores is not None:
                scores.append({"k": k_eff, "kernel": str(kern), "lengthscale_mult": float(mult),
                               "lengthscale": chosen["lengthscale"], "ridge": float(lam), "val_acc": acc})
            if acc > best_acc + 1e-12:
                best, best_acc = chosen, acc
    return best, best_acc


def knn_probe(train_x, train_y, test_x, test_y, num_classes, k: int = 20, temperature: float = 0.07) -> ProbeResult:
    """DINO's weighted k-NN vote on L2-normalised features (nothing to fit)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        scores = sk.weighted_knn(test_x.float(), train_x.float(), train_y, num_classes, k=k, temperature=temperature)
    pred = scores.argmax(dim=1)
    return ProbeResult("knn", accuracy(pred, test_y), None, 0.0, _elapsed(t0, pred),
                       {"k": min(k, len(train_x)), "T": temperature}, pred)


def ncm_probe(train_x, train_y, test_x, test_y, num_classes) -> ProbeResult:
    """Nearest class mean on L2-normalised features."""
    t0 = time.perf_counter()
    x = F.normalize(train_x.float(), dim=1)
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, train_y.long(), x)
    counts = torch.bincount(train_y.long(), minlength=num_classes).clamp_min(1).unsqueeze(1)
    means = F.normalize(means / counts, dim=1)
    fit_s = _elapsed(t0, means)
    t0 = time.perf_counter()
    pred = (F.normalize(test_x.float(), dim=1) @ means.T).argmax(dim=1)
    return ProbeResult("ncm", accuracy(pred, test_y), None, fit_s, _elapsed(t0, pred), {}, pred)


def _standardize(x_fit: torch.Tensor, *others: torch.Tensor):
    mean, std = x_fit.mean(0, keepdim=True), x_fit.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (x_fit, *others)]


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, init=None, max_iter: int = 200):
    """Multinomial logistic regression, sklearn's objective C·Σ loss + ½‖W‖² (bias unpenalised), by L-BFGS."""
    n, d = x.shape
    w = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")
    reg = 1.0 / (2.0 * C * n)  # divide sklearn's objective by C·n: mean loss + ‖W‖²/(2Cn)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(train_x, train_y, test_x, test_y, num_classes, fit_idx, val_idx,
                 c_grid=DEFAULT_C_GRID, max_iter: int = 200) -> ProbeResult:
    """Logistic-regression probe: C chosen on validation, then refitted on all labelled examples."""
    t0 = time.perf_counter()
    x_fit, x_val = _standardize(train_x[fit_idx].float(), train_x[val_idx].float())
    y_fit, y_val = train_y[fit_idx].long(), train_y[val_idx].long()
    best_c, best_acc, params = None, -1.0, None
    for C in sorted(c_grid):  # strong to weak regularisation, warm-started
        params = _fit_logreg(x_fit, y_fit, num_classes, C, init=params, max_iter=max_iter)
        acc = accuracy((x_val @ params[0] + params[1]).argmax(1), y_val)
        if acc > best_acc + 1e-12:
            best_c, best_acc = C, acc
    select_s = time.perf_counter() - t0  # accuracy() above reads the predictions back: synchronised
    x_all, x_test = _standardize(train_x.float(), test_x.float())
    w, b = _fit_logreg(x_all, train_y.long(), num_classes, best_c, max_iter=max_iter)
    fit_s = _elapsed(t0, w)
    t0 = time.perf_counter()
    pred = (x_test @ w + b).argmax(1)
    return ProbeResult("linear", accuracy(pred, test_y), best_acc, fit_s, _elapsed(t0, pred),
                       {"C": best_c}, pred, select_s=select_s, settings_tried=len(c_grid))


@contextlib.contextmanager
def rliable_seed(seed: int = 0):
    """Make rliable's bootstraps reproducible: rliable 1.2 draws its resampling indices from numpy's global
    generator (``np.random.choice``), ignoring the ``random_state`` it is given, so the same records gave
    different CIs from one table build to the next. Seeds the global generator for the block and puts
    its state back afterwards."""
    import numpy as np

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def paired_ci(diffs, reps: int = 2_000) -> tuple[float, float, float]:
    """Mean of paired per-seed differences (e.g. two readouts' test accuracies on the same split) and its
    95% percentile bootstrap CI over seeds (rliable, ``reps`` replicates, a fixed random state); the CI is
    (nan, nan) below two seeds. For the tables' ``comparisons`` hooks."""
    import warnings

    import numpy as np
    from rliable import library as rly

    d = np.asarray(list(diffs), dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    with warnings.catch_warnings(), rliable_seed(0):  # arch deprecates the RandomState rliable passes
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates({"d": [d]}, lambda x: np.array([np.mean(x)]), reps=reps,
                                               random_state=np.random.RandomState(0))
    return float(point["d"][0]), float(ci["d"][0, 0]), float(ci["d"][1, 0])
