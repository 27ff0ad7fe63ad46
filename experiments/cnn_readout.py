"""CNN readout (the paper's CNN table): does an SK readout match a trained neural readout with less training?

One run = one seed. On one backbone architecture and one split (a training subset, a validation split
carved from it, the test set), five readouts, each with its trained head parameters and training cost:

1. ``linear_joint``: a linear head trained jointly with the backbone for E epochs (the neural readout).
2. ``mlp_frozen``: an MLP head retrained on the frozen features of readout 1's backbone.
3. ``sk_frozen``: the SK readout on the same frozen features, no training (support: the training
   features with one-hot labels).
4. ``sk_e2e``: a fresh backbone (the same initial weights as readout 1) trained end-to-end through an SK
   head for a fraction of E epochs; the support of each step is the other half of the batch
   (``sk.head.support=batch``) or a memory bank of recent detached features (``memory``). The head's
   training setting is ``sk.head.{k,kernel,lengthscale,ridge,...}``. Evaluated with SK as readout 3,
   the training (fit) features as support.
5. ``knn_frozen``: DINO's weighted k-NN vote on readout 1's frozen features (cosine, k=20, T=0.07).

Optional control (``exp.short_linear_control``): ``linear_joint_short``, readout 1 with readout 4's
epoch budget, which tells whether a short budget suffices for any head.

SK readouts (3, and 4's evaluation): with ``sk.tune=true`` (k, kernel, lengthscale, ridge) are chosen
from ``sk.grid`` on the validation split with the training (fit) features as support, never on the test
set; with ``sk.tune=false`` the fixed ``sk.k``, ``sk.kernel``, ``sk.lengthscale``, ``sk.ridge`` are used.
The backbones never see the validation split. The per-epoch test accuracy of readouts 1 and 4 is stored
as curves (readout 4's with the fixed setting, as tuning every epoch would cost more than the epoch) and
drawn by ``make_figure``.

``run`` is the sequence of steps: ``read_settings`` (the config, read once), ``draw_split``,
``linear_joint_readout`` (readout 1), ``frozen_features`` and ``frozen_readouts`` (2, 3, 5),
``sk_e2e_readout`` (readout 4), the control (``linear_joint_readout`` again), the rows.

Costs: ``train_epochs`` and ``train_s`` are the readout's own gradient training (the head alone for
frozen readouts; evaluation passes not counted); ``select_s`` is hyperparameter selection on validation;
``feature_s`` is the one pass of the frozen backbone that readouts 2, 3 and 5 share.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

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
from experiments.core.probes import ProbeResult, accuracy, knn_probe, sk_probe
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


# --------------------------------------------------------------------------------------------- SK readout
def sk_readout(fit_x, fit_y, val_x, val_y, test_x, test_y, num_classes, **sk_kw) -> ProbeResult:
    """SK with the fit features as support: its setting chosen on the validation features (``grid``) or
    fixed (``grid=None``), then test predictions from the fit support. ``sk_kw``: ``sk_probe``'s keyword
    arguments (``sk_options(cfg.sk)``). ``fit_s`` of the result is the selection time.
    """
    features = torch.cat([fit_x, val_x])
    labels = torch.cat([fit_y, val_y])
    positions = torch.arange(len(labels), device=labels.device)
    return sk_probe(features, labels, test_x, test_y, num_classes, fit_idx=positions[:len(fit_y)],
                    val_idx=positions[len(fit_y):], refit=False, **sk_kw)


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
    train_kw: dict             # train_classifier's optimisation keywords for the backbone runs (1, 4, control)
    feat_kw: dict              # extract_features' keywords
    mlp: dict                  # readout 2: hidden, epochs, batch_size, lr, weight_decay
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
    train_kw = dict(batch_size=int(recipe.batch_size), lr=float(recipe.lr), device=ctx.device,
                    mean_std=data.mean_std, optimizer=str(recipe.optimizer), weight_decay=float(recipe.weight_decay),
                    amp=amp, augment=crop_flip(int(recipe.get("crop_pad", 4))) if recipe.augment == "crop_flip" else None,
                    progress=ctx.progress)
    feat_kw = dict(batch_size=int(E.eval_batch_size), device=ctx.device, mean_std=data.mean_std, amp=amp,
                   progress=ctx.progress)
    epochs = int(E.epochs)
    return Settings(seed=ctx.seed, device=ctx.device, num_classes=data.num_classes,
                    in_channels=int(data.x_train.shape[1]), epochs=epochs,
                    sk_epochs=max(1, int(round(float(E.sk_epochs_frac) * epochs))), curves=bool(E.curves),
                    short_control=bool(E.short_linear_control), train_kw=train_kw, feat_kw=feat_kw,
                    mlp=dict(hidden=int(E.mlp.hidden), epochs=int(E.mlp.epochs), batch_size=int(E.mlp.batch_size),
                             lr=float(E.mlp.lr), weight_decay=float(E.mlp.weight_decay)),
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
    """The run's backbone at its initial weights: readouts 1, 4 and the control all start from them."""
    torch.manual_seed(seed)
    backbone = create_backbone(cfg_backbone, in_channels=in_channels)
    if init_state is not None:
        backbone.load_state_dict(init_state)
    return backbone


def linear_joint_readout(backbone, split: Split, s: Settings, *, epochs: int, generator, curves: bool,
                         name: str = "linear_joint", desc: str = "1 linear+backbone"):
    """Readout 1 (and the control): a linear head trained jointly with ``backbone`` for ``epochs``.

    Returns (row, curve); with ``curves`` the curve holds each epoch's test accuracy, else it is None.
    """
    torch.manual_seed(s.seed + 1)
    linear = nn.Linear(backbone.feature_dim, s.num_classes)

    def eval_test(epoch, entry):
        return {"test_acc": accuracy(predict(backbone, linear, split.x_test, **s.feat_kw), split.y_test)}

    hist = train_classifier(backbone, linear, split.x_fit, split.y_fit, epochs=epochs, generator=generator,
                            on_epoch_end=eval_test if curves else None, desc=desc, **s.train_kw)
    acc = hist[-1]["test_acc"] if curves else eval_test(epochs, {})["test_acc"]
    row = _row(name, acc, count_params(linear), epochs, _train_s(hist),
               {"backbone": f"trained jointly, {epochs} epochs", **split.info()})
    return row, _curve(hist) if curves else None


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
    """Readout 2's head, an MLP (one hidden ReLU layer) trained on frozen features; (mlp, history).
    A selection of its hyperparameters on the validation features would call this once per setting."""
    torch.manual_seed(seed + 3)
    mlp = nn.Sequential(nn.Linear(f_fit.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    hist = train_classifier(nn.Identity(), mlp, f_fit, y_fit, epochs=epochs, batch_size=batch_size, lr=lr,
                            device=device, optimizer="adam", weight_decay=weight_decay, generator=generator,
                            progress=progress, desc="2 mlp (frozen)")
    mlp.eval()
    return mlp, hist


def frozen_readouts(feats: Features, split: Split, s: Settings, *, mlp_generator) -> list[dict]:
    """Readouts 2 (MLP retrained), 3 (SK, no training) and 5 (DINO's weighted k-NN) on the same frozen
    features; their rows."""
    d, C = s.device, s.num_classes
    y_fit, y_val, y_test = split.y_fit.to(d), split.y_val.to(d), split.y_test.to(d)
    info = {"backbone": "frozen, from linear_joint", **split.info()}
    mlp, hist = train_mlp_head(feats.fit, split.y_fit, C, **s.mlp, seed=s.seed, generator=mlp_generator,
                               device=d, progress=s.progress)
    with torch.no_grad():
        acc2 = accuracy(mlp(feats.test).argmax(1), y_test)
    res3 = sk_readout(feats.fit, y_fit, feats.val, y_val, feats.test, y_test, C, **s.sk_kw)
    res5 = knn_probe(feats.fit, y_fit, feats.test, y_test, C, **s.knn)
    return [
        _row("mlp_frozen", acc2, count_params(mlp), s.mlp["epochs"], _train_s(hist), info,
             feature_s=feats.seconds),
        _row("sk_frozen", res3.test_acc, 0, 0, 0.0, {"chosen": _fmt_chosen(res3.chosen), **info},
             val_acc=res3.val_acc, select_s=res3.fit_s, predict_s=res3.predict_s, feature_s=feats.seconds),
        _row("knn_frozen", res5.test_acc, 0, 0, 0.0, {"chosen": _fmt_chosen(res5.chosen), **info},
             predict_s=res5.predict_s, feature_s=feats.seconds),
    ]


def sk_e2e_readout(backbone, split: Split, s: Settings, *, generator):
    """Readout 4: ``backbone`` trained through an SK head (``s.head``: cnn_readout's ``sk.head`` fields)
    for ``s.sk_epochs``, then read out by SK on its own frozen features (``s.sk_kw``, as readout 3).

    With ``s.curves`` each epoch's test accuracy is measured with SK's fixed setting (tuning every epoch
    would cost more than the epoch). Returns (row, curve or None, validation accuracy of the readout).
    """
    h, d, C = s.head, s.device, s.num_classes
    head = SKHead(C, int(h["k"]), str(h["kernel"]), lengthscale_value(h["lengthscale"]), float(h["ridge"]),
                  support=str(h["support"]), bank_size=int(h["bank_size"]), normalize=s.sk_kw["normalize"],
                  learn_lengthscale=bool(h["learn_lengthscale"]))

    def feats(x, desc):
        return extract_features(backbone, x, desc=desc, **s.feat_kw).to(d)

    def eval_fixed(epoch, entry):
        res = sk_probe(feats(split.x_fit, "sk support"), split.y_fit.to(d), feats(split.x_test, "sk test"),
                       split.y_test.to(d), C, **{**s.sk_kw, "grid": None})
        return {"test_acc": res.test_acc}

    hist = train_classifier(backbone, head, split.x_fit, split.y_fit, epochs=s.sk_epochs,
                            head_forward=lambda hd, f, y: hd.training_step(f, y),
                            loss_fn=sk_loss(str(h["loss"]), float(h["logit_scale"])), generator=generator,
                            on_epoch_end=eval_fixed if s.curves else None, desc="4 backbone through SK", **s.train_kw)
    res = sk_readout(feats(split.x_fit, "sk support"), split.y_fit.to(d), feats(split.x_val, "sk val"),
                     split.y_val.to(d), feats(split.x_test, "sk test"), split.y_test.to(d), C, **s.sk_kw)
    row = _row("sk_e2e", res.test_acc, count_params(head), s.sk_epochs, _train_s(hist),
               {"chosen": _fmt_chosen(res.chosen), "head": _fmt_chosen(head.setting), "support": str(h["support"]),
                "loss": str(h["loss"]), "backbone": f"trained through SK, {s.sk_epochs} epochs", **split.info()},
               val_acc=res.val_acc, select_s=res.fit_s, predict_s=res.predict_s)
    return row, _curve(hist) if s.curves else None, res.val_acc


def _row(readout, test_acc, head_params, train_epochs, train_s, info=None, **more):
    metrics = {"test_acc": float(test_acc), "head_params": int(head_params), "train_epochs": float(train_epochs),
               "train_s": float(train_s), **{k: float(v) for k, v in more.items() if v is not None}}
    return {"keys": {"readout": readout}, "metrics": metrics, "info": info or {}}


def _curve(hist) -> dict:
    return {"x": [h["epoch"] for h in hist], "y": [h["test_acc"] for h in hist]}


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
    rows, curves = [], {}

    # readout 1: a linear head trained jointly with the backbone for E epochs
    backbone = fresh_backbone(cfg.backbone, s.in_channels, s.seed)
    init_state = copy.deepcopy(backbone.state_dict())
    row, curves["linear_joint"] = linear_joint_readout(backbone, split, s, epochs=s.epochs,
                                                       generator=ctx.generator(2), curves=s.curves)
    rows.append(row)
    ctx.log({"linear_joint/test_acc": row["metrics"]["test_acc"]})

    # readouts 2, 3 and 5 on the frozen features of readout 1's backbone
    key = {"kind": "cnn_readout_features", "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
           "data": data.name, "mean_std": data.mean_std, "in_channels": s.in_channels}
    feats = frozen_features(backbone, split, s, cache=ctx.cache, key=key)
    rows += frozen_readouts(feats, split, s, mlp_generator=ctx.generator(4))
    if module_fingerprint(backbone) != feats.weights:
        raise RuntimeError("readout 1's backbone changed while the frozen readouts used it")

    # readout 4: the same initial backbone trained end to end through an SK head for a fraction of E
    backbone4 = fresh_backbone(cfg.backbone, s.in_channels, s.seed, init_state)
    row, curves["sk_e2e"], val_acc = sk_e2e_readout(backbone4, split, s, generator=ctx.generator(2))
    rows.append(row)
    ctx.log({"sk_e2e/test_acc": row["metrics"]["test_acc"]})

    # control: readout 1 with readout 4's budget
    if s.short_control:
        backbone_s = fresh_backbone(cfg.backbone, s.in_channels, s.seed, init_state)
        rows.append(linear_joint_readout(backbone_s, split, s, epochs=s.sk_epochs, generator=ctx.generator(2),
                                         curves=False, name="linear_joint_short", desc="1' linear+backbone, short")[0])

    # rows: readouts 1-5 in the table's order, then the control
    rows.sort(key=lambda r: READOUT_ORDER.index(r["keys"]["readout"]))
    summary = {f"{r['keys']['readout']}_test_acc": r["metrics"]["test_acc"] for r in rows}
    summary["val_acc"] = val_acc
    ctx.log(summary)
    return {"rows": rows, "curves": {k: v for k, v in curves.items() if v is not None}, "summary": summary}


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
