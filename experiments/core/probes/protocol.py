"""The selection protocol every probe follows, and what a probe receives and returns.

A probe (``ProbeTask`` in, ``ProbeResult`` out) chooses its hyperparameters on the task's
``Selection`` only, never on the test set, by one rule shared by every probe of an experiment:

- ``holdout``: one fit/validation split (CNN readout, ViT probing);
- ``k-fold``: stratified k-fold cross-validation over the labelled set (training-free transfer): every
  labelled example is validated once, from a model (a support, a classifier) that did not see it;
- ``none``: nothing can be validated (one labelled example a class): every probe takes its ``default``
  setting, fixed in the config before any run (``configs/probe/<name>.yaml``, SK's in ``configs/sk``).

``choose`` runs the rule: every setting of the probe's grid is scored on every fold (pooled accuracy over
the validation examples of all folds), the best wins (ties: the first in grid order), and what choosing
cost (seconds, settings) is counted. A chosen value at the edge of a grid axis is reported (``edges``),
so that a grid too small to contain the optimum shows in the table. ``Selection.fingerprint`` names the
data a choice was made on; every row records it, so a test can check that every probe of a run chose on
the same data.
"""
from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from experiments.core.format import setting_text

RULES = ("holdout", "k-fold", "none")


@dataclass(frozen=True)
class Selection:
    """The data hyperparameters are chosen on: positions into the task's labelled set.

    ``folds``: (fit positions, validation positions) pairs; one pair for ``holdout``, k for ``k-fold``,
    none for ``none``."""

    rule: str
    folds: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"selection rule must be one of {RULES}, got {self.rule!r}")
        if (self.rule == "none") != (not self.folds):
            raise ValueError(f"rule {self.rule!r} with {len(self.folds)} folds")

    @property
    def fit_idx(self) -> torch.Tensor:
        """The fit part of a holdout split (the support of a probe that does not refit)."""
        if self.rule != "holdout":
            raise ValueError(f"a {self.rule} selection has no single fit part")
        return self.folds[0][0]

    def fingerprint(self) -> str:
        """A short hash of the rule and every fold's positions."""
        h = hashlib.sha256(self.rule.encode())
        for fit, val in self.folds:
            for t in (fit, val):
                h.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
                h.update(b"|")
        return h.hexdigest()[:12]

    def describe(self) -> str:
        return self.rule if self.rule != "k-fold" else f"{len(self.folds)}-fold"


def holdout(fit_idx: torch.Tensor, val_idx: torch.Tensor) -> Selection:
    return Selection("holdout", ((fit_idx, val_idx),))


def stratified_kfold(labels: torch.Tensor, k: int, seed: int) -> Selection:
    """Stratified k-fold cross-validation: each class's examples, in a seeded random order, dealt to the k
    folds in turn (so a class with n >= k examples has one in every fold). ``k`` is capped at the smallest
    class's size; below two examples a class nothing can be validated: rule ``none``."""
    labels = labels.detach().cpu()
    smallest = int(torch.bincount(labels).min()) if len(labels) else 0
    k = min(int(k), smallest)
    if k < 2:
        return Selection("none")
    g = torch.Generator().manual_seed(int(seed))
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold_of[idx] = torch.arange(len(idx)) % k
    positions = torch.arange(len(labels))
    return Selection("k-fold", tuple((positions[fold_of != f], positions[fold_of == f]) for f in range(k)))


@dataclass
class ProbeTask:
    """What every probe of one comparison sees: the same labelled set, selection data and test set.

    x, y: labelled features (N, d) and labels (N,); test_x, test_y: what is read out; ``refit``: the final
    model uses every labelled example (True) or, with a holdout selection, the fit part only (False).
    ``extras``: what some probes need beyond features (fine-tuning: cached activations and a copy of the
    backbone's last block)."""

    x: torch.Tensor
    y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    selection: Selection
    refit: bool = True
    seed: int = 0
    device: torch.device | str = "cpu"
    extras: dict[str, Any] = field(default_factory=dict)

    def support(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, features, labels) of the final model's training set."""
        if self.refit or self.selection.rule != "holdout":
            pos = torch.arange(len(self.y), device=self.y.device)
        else:
            pos = self.selection.fit_idx.to(self.y.device)
        return pos, self.x[pos], self.y[pos]


@dataclass
class ProbeResult:
    name: str
    test_acc: float
    val_acc: float | None
    fit_s: float
    predict_s: float
    chosen: dict[str, Any] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    select_s: float = 0.0            # seconds spent choosing hyperparameters (0: nothing chosen)
    settings_tried: int = 1          # settings evaluated to choose them (1: nothing chosen)
    grid: list[dict[str, Any]] | None = None   # every setting's selection score (SK: the sensitivity figure)
    selection: str = "none"          # the rule and the fingerprint of the data it chose on
    edges: list[str] = field(default_factory=list)  # grid axes whose chosen value sits at an end
    more: dict[str, float] = field(default_factory=dict)  # a probe's own metrics (a trained head's size, epochs)

    def metrics(self) -> dict[str, float]:
        out = {"test_acc": self.test_acc, "fit_s": self.fit_s, "predict_s": self.predict_s,
               "select_s": self.select_s, "settings_tried": self.settings_tried, **self.more}
        if self.val_acc is not None:
            out["val_acc"] = self.val_acc
        return out

    def info(self) -> dict[str, str]:
        out = {"chosen": setting_text(self.chosen)} if self.chosen else {}
        out["selection"] = self.selection
        if self.edges:
            out["grid_edge"] = ", ".join(self.edges)
        return out

    def row(self, keys: dict[str, Any], info: dict[str, str] | None = None, grid_field: str = "selection_scores") -> dict:
        """A table row (``{"keys", "metrics", "info"}``) with every setting's selection score under
        ``grid_field`` (SK's: ``sk_grid``, drawn in the sensitivity figure)."""
        out = {"keys": keys, "metrics": self.metrics(), "info": {**self.info(), **(info or {})}}
        if self.grid is not None:
            out[grid_field] = self.grid
        return out


@dataclass
class Choice:
    setting: dict[str, Any]
    val_acc: float | None
    scores: list[dict[str, Any]] | None
    select_s: float
    tried: int
    edges: list[str]
    selection: str


def grid_settings(grid: dict[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the last axis fastest: ``{"lr": [1, 2], "wd": [0]}``."""
    axes = {k: list(v) for k, v in grid.items()}
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


ScoreFold = Callable[[torch.Tensor, torch.Tensor, list[dict[str, Any]]], list[int]]


def choose(task: ProbeTask, grid: dict[str, Sequence] | None, default: dict[str, Any], score_fold: ScoreFold,
           device_sync: Callable[[], None] | None = None) -> Choice:
    """Run the task's selection rule over ``grid``.

    ``score_fold(fit_positions, val_positions, settings)`` returns, for each setting, the number of
    validation examples it classifies correctly when fitted on the fit positions. Without a grid the
    ``default`` is used and, where the task has selection data, scored on it (its ``val_acc``; nothing is
    chosen: ``settings_tried`` 1, ``select_s`` 0). With rule ``none`` nothing is scored."""
    sel = task.selection
    if sel.rule == "none":
        return Choice(dict(default), None, None, 0.0, 1, [], "none")
    label = f"{sel.describe()} {sel.fingerprint()}"
    settings = grid_settings(grid) if grid is not None else [dict(default)]
    t0 = time.perf_counter()
    hits = [0] * len(settings)
    total = 0
    for fit, val in sel.folds:
        for i, c in enumerate(score_fold(fit.to(task.y.device), val.to(task.y.device), settings)):
            hits[i] += int(c)
        total += len(val)
    if device_sync is not None:
        device_sync()
    select_s = time.perf_counter() - t0
    accs = [c / max(total, 1) for c in hits]
    if grid is None:
        return Choice(dict(default), accs[0], None, 0.0, 1, [], f"fixed (scored on {label})")
    best = max(range(len(settings)), key=lambda i: (accs[i], -i))  # ties: the first in grid order
    scores = [{**s, "val_acc": a} for s, a in zip(settings, accs)]
    return Choice(settings[best], accs[best], scores, select_s, len(settings), grid_edges(grid, settings[best]), label)


def grid_edges(grid: dict[str, Sequence], chosen: dict[str, Any]) -> list[str]:
    """``["k=max", "lr=min"]``: numeric axes of two or more values whose chosen value is their largest or
    smallest."""
    out = []
    for axis, values in grid.items():
        vals = list(values)
        if len(vals) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            continue
        if chosen[axis] == max(vals):
            out.append(f"{axis}=max")
        elif chosen[axis] == min(vals):
            out.append(f"{axis}=min")
    return out


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.cpu() == y.cpu()).float().mean())


def correct(pred: torch.Tensor, y: torch.Tensor) -> int:
    return int((pred.to(y.device) == y).sum())


def elapsed(t0: float, result: torch.Tensor) -> float:
    """Seconds since ``t0`` once ``result`` is computed: CUDA work is asynchronous, so synchronise first."""
    if result.device.type == "cuda":
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - t0
