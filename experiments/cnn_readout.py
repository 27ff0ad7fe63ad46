"""CNN readout (the paper's CNN table): does an SK readout match a trained neural readout with less training?

One run = one seed. On one backbone architecture and one split (a training subset, a validation split
carved from it, the test set), five readouts, each with its trained head parameters, its training cost
and the cost of choosing its hyperparameters on the validation split:

1. ``linear_joint``: a linear head trained jointly with the backbone for E epochs (the neural readout),
   at each learning rate of ``exp.optim.<backbone>.lr_grid``; the one with the best validation accuracy
   is the readout.
2. ``mlp_frozen``: an MLP head retrained on the frozen features of readout 1's chosen backbone, its
   learning rate and weight decay chosen from ``probe.mlp.grid``.
3. ``sk_frozen``: the SK readout on the same frozen features, no training (support: the training
   features with their labels).
4. ``sk_e2e``: a fresh backbone (the same initial weights as readout 1) trained end-to-end through an SK
   head for a fraction of E epochs, at each learning rate of readout 1's grid; the support of each step
   is the other half of the batch (``sk.head.support=batch``) or a memory bank of recent detached
   features (``memory``). The head's training setting is ``sk.head.{k,kernel,lengthscale,ridge,...}``.
   Read out with SK as readout 3 (the training (fit) features as support); the learning rate whose SK
   readout has the best validation accuracy is kept.
5. ``knn_frozen``: DINO's weighted k-NN vote on readout 1's frozen features, (k, T) chosen from
   ``probe.knn.grid``.

Readouts 2, 3 and 5 are the overlay's probes (experiments/core/probes, ``<probe>_frozen``; another probe
named in the overlay adds a row), all choosing on the same validation features (rule ``holdout``) and read
out from the fit features.

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
``sk_e2e_readout`` (readout 4), the control (``linear_joint_readout`` again), the rows. The table, its
comparisons and figures: experiments/reports/cnn_readout.py.

Costs (row metrics): ``train_s`` is the chosen setting's own gradient training (the head alone for
frozen readouts; evaluation passes not counted) and ``train_epochs`` its epochs; ``select_s`` is what
choosing on validation cost beyond that: the training (and, for readout 4, the feature passes) of every
setting not chosen, plus the scoring of every setting on validation; ``settings_tried`` counts the
settings scored (readout 4: learning rates x SK settings); ``feature_s`` is the pass of the frozen
backbone over fit, validation and test images that the SK readout needs (shared by readouts 2, 3, 5).
Each row keeps the validation accuracy of every setting it tried: ``selection`` (the backbone runs'
learning rates), ``selection_scores`` (a probe's grid) and ``sk_grid`` (SK's grid, drawn in the table's
sensitivity figure).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import sk
from experiments.backbones import create as create_backbone
from experiments.core.cache import module_fingerprint, tensor_fingerprint
from experiments.core import probes
from experiments.core.config import lengthscale_value, probe_options
from experiments.core.data import load_dataset, train_val_split
from experiments.core.format import setting_text
from experiments.core.probes import ProbeTask, Selection, accuracy, grid_settings, holdout, run_probe
from experiments.core.train import count_params, crop_flip, extract_features, predict, train_classifier

OBJECTIVES = ("val_acc",)  # readout 4's SK validation accuracy: what +hparams_search=sk_optuna maximises
READOUT_ORDER = ["linear_joint", "mlp_frozen", "sk_frozen", "sk_e2e", "knn_frozen", "linear_joint_short"]


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
class RunChoice:
    setting: dict[str, Any]    # the chosen setting
    best: Candidate
    select_s: float            # seconds spent on everything but the chosen setting's fit
    settings_tried: int
    scores: list[dict[str, Any]]  # every setting with its validation accuracy, in grid order


def select(settings: list[dict[str, Any]], fit: Callable[[dict[str, Any]], Candidate]) -> RunChoice:
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
    return RunChoice(best_setting, best, spent - best.train_s, tried, scores)


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
    probes: dict               # the frozen readouts (2, 3, 5; readout 4's evaluation is "sk"): probe_options(cfg)
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
    probes = probe_options(cfg)
    if "sk" not in probes:
        raise ValueError("cnn_readout reads readout 4 out with the SK probe: its overlay must name probe sk")
    return Settings(seed=ctx.seed, device=ctx.device, num_classes=data.num_classes,
                    in_channels=int(data.x_train.shape[1]), epochs=epochs,
                    sk_epochs=max(1, int(round(float(E.sk_epochs_frac) * epochs))), curves=bool(E.curves),
                    short_control=bool(E.short_linear_control), lr_grid=[float(v) for v in recipe.lr_grid],
                    train_kw=train_kw, feat_kw=feat_kw,
                    probes=probes, head=OmegaConf.to_container(cfg.sk.head, resolve=True),
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

    def selection(self) -> Selection:
        """The validation split as the probes see it: positions into the fit features followed by the
        validation features (rule ``holdout``). Every readout chooses on it."""
        positions = torch.arange(len(self.y_fit) + len(self.y_val))
        return holdout(positions[:len(self.y_fit)], positions[len(self.y_fit):])

    def selection_label(self) -> str:
        sel = self.selection()
        return f"{sel.describe()} {sel.fingerprint()}"


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

    sel = select(grid_settings({"lr": s.lr_grid}), fit)
    chosen = sel.best.model

    def test_acc(backbone, head):
        return accuracy(predict(backbone, head, split.x_test, **s.feat_kw), split.y_test)

    curve = per_epoch(chosen, test_acc) if curves else None
    acc = curve["y"][-1] if curves else test_acc(chosen.backbone, chosen.head)  # the last copy is the final weights
    row = _row(name, acc, count_params(chosen.head), epochs, _train_s(chosen.hist),
               {"chosen": setting_text(sel.setting), "selection": split.selection_label(),
                "backbone": f"trained jointly, {epochs} epochs", **split.info()},
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


def frozen_task(fit_x, fit_y, val_x, val_y, test_x, test_y, split: Split, s: Settings) -> ProbeTask:
    """The probes' task on one backbone's frozen features: chosen on the validation features (the split's
    ``holdout``), read out from the fit features (no refit: the validation images are never trained on)."""
    return ProbeTask(torch.cat([fit_x, val_x]), torch.cat([fit_y, val_y]), test_x, test_y, s.num_classes,
                     split.selection(), refit=False, seed=s.seed, device=s.device, extras={"progress": s.progress})


def frozen_readouts(feats: Features, split: Split, s: Settings, *, backbone_info: str) -> list[dict]:
    """Readouts 2 (MLP retrained), 3 (SK, no training) and 5 (DINO's weighted k-NN) — the overlay's probes —
    on the same frozen features and the same validation split; their rows (``<probe>_frozen``)."""
    d = s.device
    task = frozen_task(feats.fit, split.y_fit.to(d), feats.val, split.y_val.to(d), feats.test, split.y_test.to(d), split,
                       s)
    info = {"backbone": backbone_info, **split.info()}
    return [_probe_row(f"{name}_frozen", name, run_probe(name, task, opts), info, feature_s=feats.seconds)
            for name, opts in s.probes.items()]


def sk_e2e_readout(new_backbone: Callable[[], nn.Module], split: Split, s: Settings, *,
                   generator: Callable[[], torch.Generator]):
    """Readout 4: a fresh backbone trained through an SK head (``s.head``: cnn_readout's ``sk.head``
    fields) for ``s.sk_epochs`` at each learning rate of ``s.lr_grid``, each read out by the SK probe on its
    own frozen features (chosen on validation, as readout 3); the learning rate whose SK readout has the best
    validation accuracy is kept and read out on the test set at the setting it chose.

    With ``s.curves`` the chosen run's test accuracy after each epoch is measured with SK's fixed setting
    (tuning every epoch would cost more than the epoch). Returns (row, curve or None, validation accuracy).
    """
    h, d, C = s.head, s.device, s.num_classes
    sk_opts = s.probes["sk"]

    def feats(backbone, x, desc):
        return extract_features(backbone, x, desc=desc, **s.feat_kw).to(d)

    def fit(setting) -> Candidate:
        backbone = new_backbone()
        head = SKHead(C, int(h["k"]), str(h["kernel"]), lengthscale_value(h["lengthscale"]), float(h["ridge"]),
                      support=str(h["support"]), bank_size=int(h["bank_size"]), normalize=sk_opts["normalize"],
                      learn_lengthscale=bool(h["learn_lengthscale"]))
        trained = train_backbone(backbone, head, split, s, lr=setting["lr"], epochs=s.sk_epochs,
                                 generator=generator(), keep_weights=s.curves, desc="4 backbone through SK",
                                 head_forward=lambda hd, f, y: hd.training_step(f, y),
                                 loss_fn=sk_loss(str(h["loss"]), float(h["logit_scale"])))
        t0 = time.perf_counter()
        f_fit, f_val = feats(backbone, split.x_fit, "sk support"), feats(backbone, split.x_val, "sk val")
        feature_s = time.perf_counter() - t0
        y_val = split.y_val.to(d)  # validation features stand in for the test set: only the choice is read
        res = run_probe("sk", frozen_task(f_fit, split.y_fit.to(d), f_val, y_val, f_val, y_val, split, s), sk_opts)
        return Candidate(res.val_acc, _train_s(trained.hist) + feature_s, res.fit_s, (trained, f_fit, res, feature_s),
                         settings_tried=res.settings_tried)

    def read_out(backbone, f_fit, opts):
        f_test = feats(backbone, split.x_test, "sk test")
        task = ProbeTask(f_fit, split.y_fit.to(d), f_test, split.y_test.to(d), C, Selection("none"), seed=s.seed,
                         device=d)
        return run_probe("sk", task, opts)

    sel = select(grid_settings({"lr": s.lr_grid}), fit)
    chosen, f_fit, selected, feature_s = sel.best.model
    t0 = time.perf_counter()
    res = read_out(chosen.backbone, f_fit, {**sk_opts, "grid": None, "default": selected.chosen})
    feature_s += time.perf_counter() - t0 - res.predict_s
    res = dataclasses.replace(res, val_acc=selected.val_acc, fit_s=selected.fit_s, select_s=sel.select_s,
                              settings_tried=sel.settings_tried, grid=selected.grid, selection=selected.selection,
                              edges=selected.edges)

    def fixed_test_acc(backbone, head):
        return read_out(backbone, feats(backbone, split.x_fit, "sk support"), {**sk_opts, "grid": None}).test_acc

    curve = per_epoch(chosen, fixed_test_acc) if s.curves else None
    info = {"head": setting_text(chosen.head.setting), "support": str(h["support"]), "loss": str(h["loss"]),
            "backbone": f"trained through SK, {s.sk_epochs} epochs", **split.info()}
    row = _probe_row("sk_e2e", "sk", res, info, lr=sel.setting["lr"], head_params=count_params(chosen.head),
                     train_epochs=s.sk_epochs, train_s=_train_s(chosen.hist), feature_s=feature_s)
    row["selection"] = sel.scores
    return row, curve, res.val_acc


def _row(readout, test_acc, head_params, train_epochs, train_s, info=None, **more):
    metrics = {"test_acc": float(test_acc), "head_params": int(head_params), "train_epochs": float(train_epochs),
               "train_s": float(train_s), **{k: float(v) for k, v in more.items() if v is not None}}
    return {"keys": {"readout": readout}, "metrics": metrics, "info": info or {}}


def _probe_row(readout: str, probe: str, res, info: dict, lr: float | None = None, **more) -> dict:
    """The row of a readout made by a probe: its selection on validation, its grid's scores
    (``sk_grid`` for SK, ``selection_scores`` for the others), its cost; ``more`` overrides the probe's own
    head size, epochs and training seconds (0 for a probe that trains nothing)."""
    chosen = ({"lr": lr} if lr is not None else {}) | res.chosen
    size = {k: res.more.get(k, 0.0) for k in ("head_params", "train_epochs", "train_s")} | more
    row = _row(readout, res.test_acc, size.pop("head_params"), size.pop("train_epochs"), size.pop("train_s"),
               {**res.info(), "chosen": setting_text(chosen), **info}, val_acc=res.val_acc, select_s=res.select_s,
               settings_tried=res.settings_tried, predict_s=res.predict_s, **size)
    if res.grid is not None:
        row[probes.get(probe).grid_field] = res.grid
    return row


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
    rows += frozen_readouts(feats, split, s, backbone_info=f"frozen, from linear_joint ({row['info']['chosen']})")
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
