"""CNN readout (the paper's CNN table): does an SK readout match a trained neural readout with less training?

One run = one seed. On one backbone architecture and one split (a training subset, a validation split
carved from it, the test set), five readouts, each with its trained head parameters, its training cost
and the cost of choosing its hyperparameters on the validation split:

1. ``linear_joint``: a linear head trained jointly with the backbone for E epochs (the neural readout),
   at each learning rate of ``exp.optim.<backbone>.lr_grid``; the one with the best validation accuracy
   is the readout.
2. ``mlp_frozen``: an MLP head retrained on the frozen features of readout 1's chosen backbone, its
   learning rate and weight decay chosen from ``exp.mlp.lr_grid`` x ``exp.mlp.weight_decay_grid``.
3. ``sk_frozen``: the SK readout on the same frozen features, no training (support: the training
   features with one-hot labels).
4. ``sk_e2e``: a fresh backbone (the same initial weights as readout 1) trained end-to-end through an SK
   head for a fraction of E epochs, at each learning rate of readout 1's grid; the support of each step
   is the other half of the batch (``sk.head.support=batch``) or a memory bank of recent detached
   features (``memory``). The head's training setting is ``sk.head.{k,kernel,lengthscale,ridge,...}``.
   Read out with SK as readout 3 (the training (fit) features as support); the learning rate whose SK
   readout has the best validation accuracy is kept.
5. ``knn_frozen``: DINO's weighted k-NN vote on readout 1's frozen features (cosine, k=20, T=0.07).

Optional control (``exp.short_linear_control``): ``linear_joint_short``, readout 1 with readout 4's
epoch budget (its learning rate chosen the same way), which tells whether a short budget suffices for
any head.

Every choice is made on the validation split, which no backbone or head is trained on, and never on the
test set. SK readouts (3, and 4's evaluation): with ``sk.tune=true`` (k, kernel, lengthscale, ridge) are
chosen from ``sk.grid``; with ``sk.tune=false`` the fixed ``sk.k``, ``sk.kernel``, ``sk.lengthscale``,
``sk.ridge`` are used. Every learning rate of one readout starts from the same initial weights and sees
the same batches. The per-epoch test accuracy of readouts 1 and 4 (their chosen learning rate) is stored
as curves, measured after training from per-epoch copies of the weights (readout 4's with SK's fixed
setting, as tuning every epoch would cost more than the epoch), and drawn by ``make_figure``.

``run`` is the sequence of steps: ``read_settings`` (the config, read once), ``draw_split``,
``linear_joint_readout`` (readout 1), ``frozen_features`` and ``frozen_readouts`` (2, 3, 5),
``sk_e2e_readout`` (readout 4), the control (``linear_joint_readout`` again), the rows.
``comparisons`` writes the differences the README quotes under the table (``scripts/make_tables.py``).

Costs (row metrics): ``train_s`` is the chosen setting's own gradient training (the head alone for
frozen readouts; evaluation passes not counted) and ``train_epochs`` its epochs; ``select_s`` is what
choosing on validation cost beyond that: the training (and, for readout 4, the feature passes) of every
setting not chosen, plus the scoring of every setting on validation; ``settings_tried`` counts the
settings scored (readout 4: learning rates x SK settings); ``feature_s`` is the pass of the frozen
backbone over fit, validation and test images that the SK readout needs (shared by readouts 2, 3, 5).
Each row keeps the validation accuracy of every setting it tried: ``selection`` (the trained heads'
settings) and ``sk_grid`` (SK's grid, drawn in the table's sensitivity figure).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import sk
from experiments.backbones import create as create_backbone
from experiments.core.cache import module_fingerprint, tensor_fingerprint
from experiments.core.config import lengthscale_value, sk_options
from experiments.core.data import load_dataset, train_val_split
from experiments.core.probes import ProbeResult, accuracy, knn_probe, paired_ci, sk_probe
from experiments.core.train import count_params, crop_flip, extract_features, predict, train_classifier

OBJECTIVES = ("val_acc",)  # readout 4's SK validation accuracy: what +hparams_search=sk_optuna maximises
READOUT_ORDER = ["linear_joint", "mlp_frozen", "sk_frozen", "sk_e2e", "knn_frozen", "linear_joint_short"]
BOOTSTRAP_REPS = 2_000  # replicates of each paired CI in ``comparisons`` (rliable's percentile bootstrap)


# --------------------------------------------------------------------------------------------- SK head
class SKHead(nn.Module):
    """Classification head f(z) = SK(z; X, one-hot Y) whose support is given per training step.

    ``support="batch"``: each half of the batch is predicted from the other half (gradients reach both
    the evaluation points and the support representations). ``support="memory"``: the batch is predicted
    from a FIFO bank of the last ``bank_size`` detached features of earlier batches (gradients reach the
    evaluation points), falling back to the batch split until the bank holds ``k`` entries.
    """

    def __init__(self, num_classes: int, k: int, kernel: str, lengthscale, ridge: float, support: str = "batch",
                 bank_size: int = 4096, normalize: bool = True, learn_lengthscale: bool = False):
        super().__init__()
        if support not in ("batch", "memory"):
            raise ValueError(f"sk.head.support must be batch or memory, got {support!r}")
        if learn_lengthscale and lengthscale == "auto":
            raise ValueError("sk.head.learn_lengthscale=true needs a numeric lengthscale")
        self.layer = sk.SKLayer(None, None, k=k, kernel=kernel, lengthscale=lengthscale, ridge=ridge,
                                learn_lengthscale=learn_lengthscale)
        self.setting = {"k": self.layer.k, "kernel": kernel, "lengthscale": lengthscale, "ridge": ridge}
        self.num_classes, self.support, self.bank_size, self.normalize = num_classes, support, bank_size, normalize
        self.bank_x: torch.Tensor | None = None
        self.bank_y: torch.Tensor | None = None

    def _prep(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=1) if self.normalize else f

    def training_step(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) for one batch; see the class docstring for where the support comes from."""
        z = self._prep(feats)
        onehot = F.one_hot(labels, self.num_classes).to(z.dtype)
        if self.support == "memory" and self.bank_x is not None and len(self.bank_x) >= self.layer.k:
            out = self.layer(z, representations=self.bank_x, targets=F.one_hot(self.bank_y, self.num_classes).to(z.dtype))
            targets = labels
        else:
            h = len(z) // 2
            out = torch.cat([self.layer(z[:h], representations=z[h:], targets=onehot[h:]),
                             self.layer(z[h:], representations=z[:h], targets=onehot[:h])])
            targets = labels
        if self.support == "memory":
            bx = z.detach() if self.bank_x is None else torch.cat([self.bank_x, z.detach()])
            by = labels if self.bank_y is None else torch.cat([self.bank_y, labels])
            self.bank_x, self.bank_y = bx[-self.bank_size:], by[-self.bank_size:]
        return out, targets


def sk_loss(name: str, logit_scale: float):
    """``ce``: cross-entropy of the SK scores times ``logit_scale``; ``mse``: squared error to one-hot."""
    if name == "ce":
        return lambda out, y: F.cross_entropy(out * logit_scale, y)
    if name == "mse":
        return lambda out, y: (out - F.one_hot(y, out.shape[1]).to(out.dtype)).pow(2).sum(1).mean()
    raise ValueError(f"sk.head.loss must be ce or mse, got {name!r}")


# --------------------------------------------------------------------------------------------- SK readout
def sk_validate(fit_x, fit_y, val_x, val_y, num_classes, **sk_kw) -> ProbeResult:
    """SK's setting chosen on the validation features (``grid``) or fixed (``grid=None``), with the fit
    features as support. ``sk_kw``: ``sk_probe``'s keyword arguments (``sk_options(cfg.sk)``).

    The result's ``chosen``, ``val_acc``, ``select_s``, ``settings_tried`` and ``grid`` are the selection;
    ``fit_s`` is every second spent on the validation features. (Its test fields read out the validation
    features again: ``sk_test`` reads out the test set.)
    """
    features = torch.cat([fit_x, val_x])
    labels = torch.cat([fit_y, val_y])
    positions = torch.arange(len(labels), device=labels.device)
    return sk_probe(features, labels, val_x, val_y, num_classes, fit_idx=positions[:len(fit_y)],
                    val_idx=positions[len(fit_y):], refit=False, **sk_kw)


def sk_test(fit_x, fit_y, test_x, test_y, num_classes, selected: ProbeResult, *, normalize: bool,
            backend: str, **_) -> ProbeResult:
    """Test predictions of SK at ``selected``'s setting with the fit features as support, carrying the
    selection's fields (``chosen``, ``val_acc``, ``fit_s``, ``select_s``, ``settings_tried``, ``grid``)."""
    res = sk_probe(fit_x, fit_y, test_x, test_y, num_classes, grid=None, normalize=normalize, backend=backend,
                   **selected.chosen)
    return dataclasses.replace(res, val_acc=selected.val_acc, fit_s=selected.fit_s, chosen=selected.chosen,
                               select_s=selected.select_s, settings_tried=selected.settings_tried, grid=selected.grid)


def sk_readout(fit_x, fit_y, val_x, val_y, test_x, test_y, num_classes, **sk_kw) -> ProbeResult:
    """SK with the fit features as support: its setting chosen on the validation features (``grid``) or
    fixed (``grid=None``), then test predictions from the fit support (``sk_validate``, then ``sk_test``)."""
    selected = sk_validate(fit_x, fit_y, val_x, val_y, num_classes, **sk_kw)
    return sk_test(fit_x, fit_y, test_x, test_y, num_classes, selected, **sk_kw)


# --------------------------------------------------------------------------------------------- selection
@dataclass
class Candidate:
    """One setting trained and scored on the validation split (what ``fit`` returns to ``select``)."""

    val_acc: float
    train_s: float             # fitting it: the readout's own cost if chosen, selection cost if not
    val_s: float               # scoring it on validation: selection cost either way
    model: Any = None          # what the readout needs of the chosen setting
    settings_tried: int = 1    # settings scored inside it (readout 4: SK's grid at this learning rate)


@dataclass
class Selection:
    setting: dict[str, Any]    # the chosen setting
    best: Candidate
    select_s: float            # seconds spent on everything but the chosen setting's fit
    settings_tried: int
    scores: list[dict[str, Any]]  # every setting with its validation accuracy, in grid order


def grid_settings(**axes) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the last axis fastest: ``grid_settings(lr=[1, 2], wd=[0])``."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def select(settings: list[dict[str, Any]], fit: Callable[[dict[str, Any]], Candidate]) -> Selection:
    """Train and score every setting (``fit(setting) -> Candidate``); keep the best validation accuracy
    (ties: the first in grid order). Only the best candidate so far is held in memory."""
    best, best_setting, scores, spent, tried = None, None, [], 0.0, 0
    for setting in settings:
        cand = fit(setting)
        scores.append({**setting, "val_acc": float(cand.val_acc)})
        spent += cand.train_s + cand.val_s
        tried += cand.settings_tried
        if best is None or cand.val_acc > best.val_acc + 1e-12:
            best, best_setting = cand, setting
        del cand  # a setting beaten is freed before the next one trains
    if best is None:
        raise ValueError("nothing to choose from: the grid is empty")
    return Selection(best_setting, best, spent - best.train_s, tried, scores)


# --------------------------------------------------------------------------------------------- steps
@dataclass
class Settings:
    """Everything a run reads from its config, as plain values (``read_settings``)."""

    seed: int
    device: torch.device
    num_classes: int
    in_channels: int
    epochs: int                # E: readout 1's epochs
    sk_epochs: int             # readout 4's (and the control's) epochs
    curves: bool
    short_control: bool
    lr_grid: list[float]       # learning rates of the backbone runs (1, 4, control), chosen on validation
    train_kw: dict             # train_classifier's other optimisation keywords for the backbone runs
    feat_kw: dict              # extract_features' keywords
    mlp: dict                  # readout 2: hidden, epochs, batch_size
    mlp_grid: dict             # readout 2's choices: lr, weight_decay (lists)
    knn: dict                  # readout 5: k, temperature
    sk_kw: dict                # readouts 3 and 4's evaluation: sk_probe's keywords (sk_options(cfg.sk))
    head: dict                 # readout 4's SK head: cfg.sk.head
    progress: Callable         # ctx.progress


def read_settings(cfg, data, ctx) -> Settings:
    """The config line of this experiment: ``cfg.exp``, ``cfg.sk`` and the backbone's recipe, read once."""
    E = cfg.exp
    recipe = E.optim[cfg.backbone.name] if cfg.backbone.name in E.optim else E.optim.default
    if recipe.augment not in ("none", "crop_flip"):
        raise ValueError(f"exp.optim.*.augment must be none or crop_flip, got {recipe.augment!r}")
    amp = bool(E.amp)
    train_kw = dict(batch_size=int(recipe.batch_size), device=ctx.device, mean_std=data.mean_std,
                    optimizer=str(recipe.optimizer), weight_decay=float(recipe.weight_decay), amp=amp,
                    augment=crop_flip(int(recipe.get("crop_pad", 4))) if recipe.augment == "crop_flip" else None,
                    progress=ctx.progress)
    feat_kw = dict(batch_size=int(E.eval_batch_size), device=ctx.device, mean_std=data.mean_std, amp=amp,
                   progress=ctx.progress)
    epochs = int(E.epochs)
    return Settings(seed=ctx.seed, device=ctx.device, num_classes=data.num_classes,
                    in_channels=int(data.x_train.shape[1]), epochs=epochs,
                    sk_epochs=max(1, int(round(float(E.sk_epochs_frac) * epochs))), curves=bool(E.curves),
                    short_control=bool(E.short_linear_control), lr_grid=[float(v) for v in recipe.lr_grid],
                    train_kw=train_kw, feat_kw=feat_kw,
                    mlp=dict(hidden=int(E.mlp.hidden), epochs=int(E.mlp.epochs), batch_size=int(E.mlp.batch_size)),
                    mlp_grid=dict(lr=[float(v) for v in E.mlp.lr_grid],
                                  weight_decay=[float(v) for v in E.mlp.weight_decay_grid]),
                    knn=dict(k=int(E.knn.k), temperature=float(E.knn.temperature)),
                    sk_kw=sk_options(cfg.sk), head=OmegaConf.to_container(cfg.sk.head, resolve=True),
                    progress=ctx.progress)


@dataclass
class Split:
    """The images of one run: fit (the backbones' training set, SK's support), val, test."""

    x_fit: torch.Tensor
    y_fit: torch.Tensor
    fit_idx: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    val_idx: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_idx: torch.Tensor

    def info(self) -> dict[str, str]:
        return {"train_fit": str(len(self.y_fit)), "val": str(len(self.y_val)), "test": str(len(self.y_test))}


def draw_split(data, *, train_size: int | None, val_size: int, test_size: int | None, seed: int) -> Split:
    """A seeded training subset, a validation split carved from it, a fixed test subset (the same for
    every seed); ``None`` sizes take everything."""
    n_all = len(data.y_train)
    sub = torch.arange(n_all)
    if train_size is not None and train_size < n_all:
        sub = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed + 1))[:train_size].sort().values
    fit_rel, val_rel = train_val_split(len(sub), val_size, seed)
    fit_idx, val_idx = sub[fit_rel], sub[val_rel]
    test_idx = torch.arange(len(data.y_test))
    if test_size is not None and test_size < len(test_idx):
        test_idx = torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(0))[:test_size].sort().values
    return Split(data.x_train[fit_idx], data.y_train[fit_idx], fit_idx, data.x_train[val_idx], data.y_train[val_idx],
                 val_idx, data.x_test[test_idx], data.y_test[test_idx], test_idx)


def fresh_backbone(cfg_backbone, in_channels: int, seed: int, init_state: dict | None = None) -> nn.Module:
    """The run's backbone at its initial weights: every backbone run (1, 4, control) starts from them."""
    torch.manual_seed(seed)
    backbone = create_backbone(cfg_backbone, in_channels=in_channels)
    if init_state is not None:
        backbone.load_state_dict(init_state)
    return backbone


@dataclass
class Trained:
    """A backbone run at one learning rate: the modules, the training history, and with curves a CPU copy
    of the weights after every epoch (``weights[e]``: {"backbone": state, "head": state})."""

    backbone: nn.Module
    head: nn.Module
    hist: list[dict]
    weights: list[dict]


def train_backbone(backbone: nn.Module, head: nn.Module, split: Split, s: Settings, *, lr: float, epochs: int,
                   generator, keep_weights: bool, desc: str, **train_kw) -> Trained:
    """``head(backbone(x))`` trained on the fit images at learning rate ``lr`` (``s.train_kw`` and
    ``train_kw`` for the rest); with ``keep_weights`` a copy of the weights after every epoch."""
    weights: list[dict] = []

    def copy_weights(epoch, entry):
        weights.append({"backbone": _cpu_state(backbone), "head": _cpu_state(head)})

    hist = train_classifier(backbone, head, split.x_fit, split.y_fit, epochs=epochs, lr=lr, generator=generator,
                            on_epoch_end=copy_weights if keep_weights else None, desc=f"{desc}, lr={lr:g}",
                            **s.train_kw, **train_kw)
    return Trained(backbone, head, hist, weights)


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)  # extra state: a dict
            for k, v in module.state_dict().items()}


def per_epoch(trained: Trained, evaluate: Callable[[nn.Module, nn.Module], float]) -> dict:
    """The curve ``{"x": epochs, "y": evaluate(backbone, head) at each epoch's weights}`` of a run."""
    backbone, head = copy.deepcopy(trained.backbone), copy.deepcopy(trained.head)
    ys = []
    for w in trained.weights:
        backbone.load_state_dict(w["backbone"])
        head.load_state_dict(w["head"])
        ys.append(evaluate(backbone, head))
    return {"x": [h["epoch"] for h in trained.hist], "y": ys}


def linear_joint_readout(new_backbone: Callable[[], nn.Module], split: Split, s: Settings, *, epochs: int,
                         generator: Callable[[], torch.Generator], curves: bool, name: str = "linear_joint",
                         desc: str = "1 linear+backbone"):
    """Readout 1 (and the control): a linear head trained jointly with the backbone for ``epochs`` at each
    learning rate of ``s.lr_grid``; the one with the best validation accuracy is the readout.

    ``new_backbone()`` is the backbone at its initial weights and ``generator()`` the batch order, the same
    for every learning rate. Returns (row, curve or None, the chosen run); with ``curves`` the curve holds
    the chosen run's test accuracy after each epoch.
    """

    def fit(setting) -> Candidate:
        backbone = new_backbone()
        torch.manual_seed(s.seed + 1)
        linear = nn.Linear(backbone.feature_dim, s.num_classes)
        trained = train_backbone(backbone, linear, split, s, lr=setting["lr"], epochs=epochs, generator=generator(),
                                 keep_weights=curves, desc=desc)
        t0 = time.perf_counter()
        val_acc = accuracy(predict(backbone, linear, split.x_val, **s.feat_kw), split.y_val)
        return Candidate(val_acc, _train_s(trained.hist), time.perf_counter() - t0, trained)

    sel = select(grid_settings(lr=s.lr_grid), fit)
    chosen = sel.best.model

    def test_acc(backbone, head):
        return accuracy(predict(backbone, head, split.x_test, **s.feat_kw), split.y_test)

    curve = per_epoch(chosen, test_acc) if curves else None
    acc = curve["y"][-1] if curves else test_acc(chosen.backbone, chosen.head)  # the last copy is the final weights
    row = _row(name, acc, count_params(chosen.head), epochs, _train_s(chosen.hist),
               {"chosen": _fmt_chosen(sel.setting), "backbone": f"trained jointly, {epochs} epochs", **split.info()},
               val_acc=sel.best.val_acc, select_s=sel.select_s, settings_tried=sel.settings_tried)
    row["selection"] = sel.scores
    return row, curve, chosen


@dataclass
class Features:
    """Frozen features of one backbone for the three parts of a split (on the run's device)."""

    fit: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    weights: str               # fingerprint of the backbone that computed them
    seconds: float


def frozen_features(backbone, split: Split, s: Settings, *, cache, key: dict) -> Features:
    """Features of ``backbone``, frozen here, for fit, val and test (cached under ``key``, its weights and
    the split)."""
    backbone.eval()
    backbone.requires_grad_(False)
    weights = module_fingerprint(backbone)

    def features(name, x, idx):
        parts = {**key, "weights": weights, "split": name, "indices": tensor_fingerprint(idx)}
        return cache.get_or_compute(parts, lambda: extract_features(backbone, x, desc=f"features {name}", **s.feat_kw))

    t0 = time.perf_counter()
    fit, val, test = (features("fit", split.x_fit, split.fit_idx), features("val", split.x_val, split.val_idx),
                      features("test", split.x_test, split.test_idx))
    return Features(fit.to(s.device), val.to(s.device), test.to(s.device), weights, time.perf_counter() - t0)


def train_mlp_head(f_fit, y_fit, num_classes: int, *, hidden: int, epochs: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int, generator, device, progress):
    """Readout 2's head, an MLP (one hidden ReLU layer) trained with Adam on frozen features (``f_fit``,
    used as they are); (mlp in eval mode, history). Every setting starts from the same initial weights."""
    torch.manual_seed(seed + 3)
    mlp = nn.Sequential(nn.Linear(f_fit.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    hist = train_classifier(nn.Identity(), mlp, f_fit, y_fit, epochs=epochs, batch_size=batch_size, lr=lr,
                            device=device, optimizer="adam", weight_decay=weight_decay, generator=generator,
                            progress=progress, desc=f"2 mlp (frozen), lr={lr:g}, wd={weight_decay:g}")
    mlp.eval()
    return mlp, hist


def frozen_readouts(feats: Features, split: Split, s: Settings, *, mlp_generator: Callable[[], torch.Generator],
                    backbone_info: str) -> list[dict]:
    """Readouts 2 (MLP retrained, its lr and weight decay chosen on validation), 3 (SK, no training) and
    5 (DINO's weighted k-NN) on the same frozen features; their rows."""
    d, C = s.device, s.num_classes
    y_fit, y_val, y_test = split.y_fit.to(d), split.y_val.to(d), split.y_test.to(d)
    info = {"backbone": backbone_info, **split.info()}

    def fit_mlp(setting) -> Candidate:
        mlp, hist = train_mlp_head(feats.fit, y_fit, C, **s.mlp, **setting, seed=s.seed, generator=mlp_generator(),
                                   device=d, progress=s.progress)
        t0 = time.perf_counter()
        with torch.no_grad():
            val_acc = accuracy(mlp(feats.val).argmax(1), y_val)
        return Candidate(val_acc, _train_s(hist), time.perf_counter() - t0, (mlp, hist))

    sel2 = select(grid_settings(**s.mlp_grid), fit_mlp)
    mlp, hist = sel2.best.model
    with torch.no_grad():
        acc2 = accuracy(mlp(feats.test).argmax(1), y_test)
    res3 = sk_readout(feats.fit, y_fit, feats.val, y_val, feats.test, y_test, C, **s.sk_kw)
    res5 = knn_probe(feats.fit, y_fit, feats.test, y_test, C, **s.knn)
    row2 = _row("mlp_frozen", acc2, count_params(mlp), s.mlp["epochs"], _train_s(hist),
                {"chosen": _fmt_chosen(sel2.setting), **info}, val_acc=sel2.best.val_acc, select_s=sel2.select_s,
                settings_tried=sel2.settings_tried, feature_s=feats.seconds)
    row2["selection"] = sel2.scores
    return [
        row2,
        _sk_row("sk_frozen", res3, 0, 0, 0.0, info, feature_s=feats.seconds),
        _row("knn_frozen", res5.test_acc, 0, 0, 0.0, {"chosen": _fmt_chosen(res5.chosen), **info},
             select_s=0.0, settings_tried=1, predict_s=res5.predict_s, feature_s=feats.seconds),
    ]


def sk_e2e_readout(new_backbone: Callable[[], nn.Module], split: Split, s: Settings, *,
                   generator: Callable[[], torch.Generator]):
    """Readout 4: a fresh backbone trained through an SK head (``s.head``: cnn_readout's ``sk.head``
    fields) for ``s.sk_epochs`` at each learning rate of ``s.lr_grid``, each read out by SK on its own
    frozen features (``s.sk_kw``, as readout 3: ``sk_validate``); the learning rate whose SK readout has
    the best validation accuracy is kept and read out on the test set.

    With ``s.curves`` the chosen run's test accuracy after each epoch is measured with SK's fixed setting
    (tuning every epoch would cost more than the epoch). Returns (row, curve or None, validation accuracy).
    """
    h, d, C = s.head, s.device, s.num_classes

    def feats(backbone, x, desc):
        return extract_features(backbone, x, desc=desc, **s.feat_kw).to(d)

    def fit(setting) -> Candidate:
        backbone = new_backbone()
        head = SKHead(C, int(h["k"]), str(h["kernel"]), lengthscale_value(h["lengthscale"]), float(h["ridge"]),
                      support=str(h["support"]), bank_size=int(h["bank_size"]), normalize=s.sk_kw["normalize"],
                      learn_lengthscale=bool(h["learn_lengthscale"]))
        trained = train_backbone(backbone, head, split, s, lr=setting["lr"], epochs=s.sk_epochs,
                                 generator=generator(), keep_weights=s.curves, desc="4 backbone through SK",
                                 head_forward=lambda hd, f, y: hd.training_step(f, y),
                                 loss_fn=sk_loss(str(h["loss"]), float(h["logit_scale"])))
        t0 = time.perf_counter()
        f_fit, f_val = feats(backbone, split.x_fit, "sk support"), feats(backbone, split.x_val, "sk val")
        feature_s = time.perf_counter() - t0
        res = sk_validate(f_fit, split.y_fit.to(d), f_val, split.y_val.to(d), C, **s.sk_kw)
        return Candidate(res.val_acc, _train_s(trained.hist) + feature_s, res.fit_s, (trained, f_fit, res, feature_s),
                         settings_tried=res.settings_tried)

    sel = select(grid_settings(lr=s.lr_grid), fit)
    chosen, f_fit, selected, feature_s = sel.best.model
    t0 = time.perf_counter()
    f_test = feats(chosen.backbone, split.x_test, "sk test")
    feature_s += time.perf_counter() - t0
    res = sk_test(f_fit, split.y_fit.to(d), f_test, split.y_test.to(d), C, selected, **s.sk_kw)
    res = dataclasses.replace(res, select_s=sel.select_s, settings_tried=sel.settings_tried)

    def fixed_test_acc(backbone, head):
        return sk_probe(feats(backbone, split.x_fit, "sk support"), split.y_fit.to(d),
                        feats(backbone, split.x_test, "sk test"), split.y_test.to(d), C,
                        **{**s.sk_kw, "grid": None}).test_acc

    curve = per_epoch(chosen, fixed_test_acc) if s.curves else None
    info = {"head": _fmt_chosen(chosen.head.setting), "support": str(h["support"]), "loss": str(h["loss"]),
            "backbone": f"trained through SK, {s.sk_epochs} epochs", **split.info()}
    row = _sk_row("sk_e2e", res, count_params(chosen.head), s.sk_epochs, _train_s(chosen.hist), info,
                  lr=sel.setting["lr"], feature_s=feature_s)
    row["selection"] = sel.scores
    return row, curve, res.val_acc


def _row(readout, test_acc, head_params, train_epochs, train_s, info=None, **more):
    metrics = {"test_acc": float(test_acc), "head_params": int(head_params), "train_epochs": float(train_epochs),
               "train_s": float(train_s), **{k: float(v) for k, v in more.items() if v is not None}}
    return {"keys": {"readout": readout}, "metrics": metrics, "info": info or {}}


def _sk_row(readout, res: ProbeResult, head_params, train_epochs, train_s, info, lr=None, **more):
    """The row of an SK readout: its selection on validation, with SK's score at every grid setting."""
    chosen = ({"lr": lr} if lr is not None else {}) | res.chosen
    row = _row(readout, res.test_acc, head_params, train_epochs, train_s, {"chosen": _fmt_chosen(chosen), **info},
               val_acc=res.val_acc, select_s=res.select_s, settings_tried=res.settings_tried,
               predict_s=res.predict_s, **more)
    if res.grid is not None:
        row["sk_grid"] = res.grid
    return row


def _fmt_chosen(chosen: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())


def _train_s(hist) -> float:
    return hist[-1]["train_s"] if hist else 0.0


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


# --------------------------------------------------------------------------------------------- run
def run(cfg, ctx) -> dict:
    data = load_dataset(cfg.data)
    s = read_settings(cfg, data, ctx)
    split = draw_split(data, train_size=_int_or_none(cfg.exp.train_size), val_size=int(cfg.exp.val_size),
                       test_size=_int_or_none(cfg.exp.test_size), seed=s.seed)
    init_state = copy.deepcopy(fresh_backbone(cfg.backbone, s.in_channels, s.seed).state_dict())

    def new_backbone():  # every backbone run starts from the same weights and sees the same batches
        return fresh_backbone(cfg.backbone, s.in_channels, s.seed, init_state)

    rows, curves = [], {}

    # readout 1: a linear head trained jointly with the backbone for E epochs, its lr chosen on validation
    row, curves["linear_joint"], run1 = linear_joint_readout(new_backbone, split, s, epochs=s.epochs,
                                                             generator=lambda: ctx.generator(2), curves=s.curves)
    rows.append(row)
    ctx.log({"linear_joint/test_acc": row["metrics"]["test_acc"]})

    # readouts 2, 3 and 5 on the frozen features of readout 1's chosen backbone
    key = {"kind": "cnn_readout_features", "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
           "data": data.name, "mean_std": data.mean_std, "in_channels": s.in_channels}
    feats = frozen_features(run1.backbone, split, s, cache=ctx.cache, key=key)
    rows += frozen_readouts(feats, split, s, mlp_generator=lambda: ctx.generator(4),
                            backbone_info=f"frozen, from linear_joint ({row['info']['chosen']})")
    if module_fingerprint(run1.backbone) != feats.weights:
        raise RuntimeError("readout 1's backbone changed while the frozen readouts used it")

    # readout 4: the same initial backbone trained end to end through an SK head for a fraction of E
    row, curves["sk_e2e"], val_acc = sk_e2e_readout(new_backbone, split, s, generator=lambda: ctx.generator(2))
    rows.append(row)
    ctx.log({"sk_e2e/test_acc": row["metrics"]["test_acc"]})

    # control: readout 1 with readout 4's budget
    if s.short_control:
        rows.append(linear_joint_readout(new_backbone, split, s, epochs=s.sk_epochs, generator=lambda: ctx.generator(2),
                                         curves=False, name="linear_joint_short", desc="1' linear+backbone, short")[0])

    # rows: readouts 1-5 in the table's order, then the control
    rows.sort(key=lambda r: READOUT_ORDER.index(r["keys"]["readout"]))
    summary = {f"{r['keys']['readout']}_test_acc": r["metrics"]["test_acc"] for r in rows}
    summary["val_acc"] = val_acc
    ctx.log(summary)
    return {"rows": rows, "curves": {k: v for k, v in curves.items() if v is not None}, "summary": summary}


# --------------------------------------------------------------------------------------------- comparisons
LABELS = {"linear_joint": "linear head trained jointly", "mlp_frozen": "MLP head on frozen features",
          "sk_frozen": "SK on frozen features", "sk_e2e": "backbone trained through SK",
          "knn_frozen": "k-NN on frozen features", "linear_joint_short": "linear head trained jointly, short"}
DIFFERENCES = [("sk_frozen", "linear_joint"), ("sk_frozen", "mlp_frozen"), ("sk_frozen", "knn_frozen"),
               ("sk_e2e", "linear_joint"), ("sk_e2e", "linear_joint_short")]


def _by_seed(records: list[dict], metric: str) -> dict[str, dict[Any, float]]:
    """{readout: {seed: metric}} over the records (one per seed)."""
    out: dict[str, dict[Any, float]] = {}
    for rec in records:
        for row in rec["rows"]:
            if metric in row["metrics"]:
                out.setdefault(row["keys"]["readout"], {})[rec.get("seed")] = float(row["metrics"][metric])
    return out


def _pct(values: list[float]) -> str:
    """``mean ± std`` in percent, two decimals: the table's format (sample std, 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * std:.2f}"


def _points(v: float) -> str:
    """A difference of accuracies in points, two decimals, signed, with a true minus sign."""
    return f"{100 * v:+.2f}".replace("-", "−")


def comparisons(records: list[dict]) -> list[str]:
    """What the README quotes from one section of the table (``scripts/make_tables.py`` calls it).

    - each readout's test accuracy, mean ± std over seeds (as in the table);
    - paired differences (``DIFFERENCES``) in points: the mean over the seeds where both ran (same split
      and initial weights: paired) with a 95% percentile bootstrap CI of the per-seed differences;
    - the settings each readout chose on validation, and what choosing cost (``select_s``,
      ``settings_tried``), with SK's selection time on frozen features against the MLP head's.
    """
    if not records:
        return []
    acc = _by_seed(records, "test_acc")
    readouts = [r for r in READOUT_ORDER if r in acc] + [r for r in acc if r not in READOUT_ORDER]
    n = len({rec.get("seed") for rec in records})
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    lines = [f"- Test accuracy (%, mean ± std over {seeds}): "
             + "; ".join(f"{r} {_pct(list(acc[r].values()))}" for r in readouts)]
    diffs = []
    for a, b in DIFFERENCES:
        if a not in acc or b not in acc:
            continue
        common = sorted(set(acc[a]) & set(acc[b]), key=str)
        mean, lo, hi = paired_ci([acc[a][k] - acc[b][k] for k in common], reps=BOOTSTRAP_REPS)
        ci = f" [{_points(lo)}, {_points(hi)}]" if math.isfinite(lo) else " (one seed: no CI)"
        diffs.append(f"  - {a} − {b}: {_points(mean)}{ci}")
    if diffs:
        lines.append(f"- Paired differences in test accuracy, in points: mean over the {seeds} (the same split and "
                     f"initial weights for every readout) with a 95% percentile bootstrap CI of the per-seed "
                     f"differences (rliable, {BOOTSTRAP_REPS:,} replicates):")
        lines += diffs
    chosen: dict[str, Counter] = {}
    for rec in records:
        for row in rec["rows"]:
            if row.get("selection"):  # the first best, as ``select`` chose it
                best = max(row["selection"], key=lambda e: e["val_acc"])
                setting = _fmt_chosen({k: v for k, v in best.items() if k != "val_acc"})
                chosen.setdefault(row["keys"]["readout"], Counter())[setting] += 1
    if chosen:
        lines.append("- Chosen on validation (seeds choosing it): " + "; ".join(
            f"{r} " + ", ".join(f"`{c}` ({k})" for c, k in chosen[r].most_common()) for r in readouts if r in chosen))
    cost, tried = _by_seed(records, "select_s"), _by_seed(records, "settings_tried")
    parts = [f"{r} {statistics.fmean(cost[r].values()):.3g} s for {statistics.fmean(tried[r].values()):.0f} settings"
             for r in readouts if r in cost and r in tried and max(tried[r].values()) > 1]
    if parts:
        line = "- Selection cost (seconds choosing hyperparameters on validation, mean over seeds): " + "; ".join(parts)
        if "sk_frozen" in cost and "mlp_frozen" in cost and statistics.fmean(cost["mlp_frozen"].values()) > 0:
            ratio = statistics.fmean(cost["sk_frozen"].values()) / statistics.fmean(cost["mlp_frozen"].values())
            line += f"; SK on frozen features took {ratio:.2f}× the MLP head's selection time"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------------------------- figure
def make_figure(records: list[dict], path) -> None:
    """Test accuracy against training epochs for readouts 1 and 4: mean over seeds with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"linear_joint": "linear head, trained jointly (readout 1)",
              "sk_e2e": "backbone trained through SK (readout 4)"}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    for name, label in labels.items():
        by_x: dict[float, list[float]] = {}
        for rec in records:
            c = rec.get("curves", {}).get(name)
            if not c:
                continue
            for x, y in zip(c["x"], c["y"]):
                by_x.setdefault(float(x), []).append(float(y))
        if not by_x:
            continue
        xs = sorted(by_x)
        mean = np.array([np.mean(by_x[x]) for x in xs])
        std = np.array([np.std(by_x[x]) for x in xs])
        n = min(len(by_x[x]) for x in xs)
        line, = ax.plot(xs, mean, marker="o", label=f"{label} (n={n})")
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        drawn = True
    ax.set_xlabel("training epochs")
    ax.set_ylabel("test accuracy")
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
