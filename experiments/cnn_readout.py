"""CNN readout (the paper's CNN table): does an SK readout match a trained neural readout with less training?

One run = one seed. On one backbone architecture and one split (a training subset, a validation split
carved from it, the test set), five readouts, each with its trained head parameters and training cost:

1. ``linear_joint``: a linear head trained jointly with the backbone for E epochs (the neural readout).
2. ``mlp_frozen``: an MLP head retrained on the frozen features of readout 1's backbone.
3. ``sk_frozen``: the SK readout on the same frozen features, no training (support: the training
   features with one-hot labels).
4. ``sk_e2e``: a fresh backbone (the same initial weights as readout 1) trained end-to-end through an SK
   head for a fraction of E epochs; the support of each step is the other half of the batch
   (``sk_head.support=batch``) or a memory bank of recent detached features (``memory``). Evaluated
   with SK, the full training set's features as support.
5. ``knn_frozen``: DINO's weighted k-NN vote on readout 1's frozen features (cosine, k=20, T=0.07).

Optional control (``exp.short_linear_control``): ``linear_joint_short``, readout 1 with readout 4's
epoch budget, which tells whether a short budget suffices for any head.

SK hyperparameters (k, kernel, lengthscale, ridge) are chosen on the validation split with the training
(fit) features as support, never on the test set; the backbones never see the validation split. The
per-epoch test accuracy of readouts 1 and 4 is stored as curves (readout 4's with the fixed ``cfg.sk``
values, as tuning every epoch would cost more than the epoch) and drawn by ``make_figure``.

Costs: ``train_epochs`` and ``train_s`` are the readout's own gradient training (the head alone for
frozen readouts; evaluation passes not counted); ``select_s`` is hyperparameter selection on validation;
``feature_s`` is the one pass of the frozen backbone that readouts 2, 3 and 5 share.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import sk
from experiments.backbones import create as create_backbone
from experiments.core.cache import module_fingerprint, tensor_fingerprint
from experiments.core.data import load_dataset, train_val_split
from experiments.core.probes import accuracy, knn_probe, sk_probe, tune_sk
from experiments.core.train import count_params, crop_flip, extract_features, predict, train_classifier

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
            raise ValueError(f"sk_head.support must be batch or memory, got {support!r}")
        if learn_lengthscale and lengthscale == "auto":
            raise ValueError("sk_head.learn_lengthscale=true needs a numeric lengthscale")
        self.layer = sk.SKLayer(None, None, k=k, kernel=kernel, lengthscale=lengthscale, ridge=ridge,
                                learn_lengthscale=learn_lengthscale)
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
    raise ValueError(f"sk_head.loss must be ce or mse, got {name!r}")


# --------------------------------------------------------------------------------------------- SK readout
def sk_readout(fit_x, fit_y, val_x, val_y, test_x, test_y, num_classes, cfg_sk, grid):
    """SK tuned on validation (support: fit features), then test predictions from the fit support.

    Returns a ``ProbeResult``; ``fit_s`` is the selection time (SK itself fits nothing).
    """
    normalize = bool(cfg_sk.get("normalize", True))
    prep = (lambda t: F.normalize(t.float(), dim=1)) if normalize else (lambda t: t.float())
    t0 = time.perf_counter()
    chosen, val_acc = tune_sk(prep(fit_x), fit_y, prep(val_x), val_y, num_classes, grid,
                              backend=cfg_sk.get("backend", "torch"))
    select_s = time.perf_counter() - t0
    fixed = OmegaConf.create({**OmegaConf.to_container(cfg_sk, resolve=True), **chosen, "tune": False})
    res = sk_probe(fit_x, fit_y, test_x, test_y, num_classes, fixed)
    res.val_acc, res.fit_s = val_acc, select_s
    return res


def sk_fixed_acc(fit_x, fit_y, test_x, test_y, num_classes, cfg_sk) -> float:
    """Test accuracy of SK with the untuned ``cfg_sk`` values (k, kernel, lengthscale, ridge)."""
    fixed = OmegaConf.create({**OmegaConf.to_container(cfg_sk, resolve=True), "tune": False})
    return sk_probe(fit_x, fit_y, test_x, test_y, num_classes, fixed).test_acc


# --------------------------------------------------------------------------------------------- run
def _row(readout, test_acc, head_params, train_epochs, train_s, info=None, **more):
    metrics = {"test_acc": float(test_acc), "head_params": int(head_params), "train_epochs": float(train_epochs),
               "train_s": float(train_s), **{k: float(v) for k, v in more.items() if v is not None}}
    return {"keys": {"readout": readout}, "metrics": metrics, "info": info or {}}


def _fmt_chosen(chosen: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())


def run(cfg, ctx) -> dict:
    E = cfg.exp
    seed = ctx.seed
    device = ctx.device
    data = load_dataset(cfg.data)
    mean_std = data.mean_std
    C = data.num_classes

    # ---- split: a seeded training subset, a validation split carved from it, the whole test set
    n_all = len(data.y_train)
    sub = torch.arange(n_all)
    if E.train_size is not None and int(E.train_size) < n_all:
        sub = torch.randperm(n_all, generator=ctx.generator(1)).narrow(0, 0, int(E.train_size)).sort().values
    val_size = int(E.val_size if E.val_size is not None else cfg.data.val_size)
    fit_rel, val_rel = train_val_split(len(sub), val_size, seed)
    fit_idx, val_idx = sub[fit_rel], sub[val_rel]
    x_fit, y_fit = data.x_train[fit_idx], data.y_train[fit_idx]
    x_val, y_val = data.x_train[val_idx], data.y_train[val_idx]
    test_keep = torch.arange(len(data.y_test))
    if E.test_size is not None and int(E.test_size) < len(test_keep):  # a fixed subset, the same for every seed
        test_keep = torch.randperm(len(test_keep), generator=torch.Generator().manual_seed(0))[:int(E.test_size)].sort().values
    x_test, y_test = data.x_test[test_keep], data.y_test[test_keep]

    opt = E.optim[cfg.backbone.name] if cfg.backbone.name in E.optim else E.optim.default
    augment = crop_flip(int(opt.get("crop_pad", 4))) if opt.augment == "crop_flip" else None
    if opt.augment not in (None, "none", "crop_flip"):
        raise ValueError(f"exp.optim.*.augment must be none or crop_flip, got {opt.augment!r}")
    in_channels = int(data.x_train.shape[1])
    amp = bool(E.amp)
    common = dict(batch_size=int(opt.batch_size), lr=float(opt.lr), device=device, mean_std=mean_std,
                  optimizer=str(opt.optimizer), weight_decay=float(opt.weight_decay), amp=amp,
                  progress=ctx.progress)
    eval_bs = int(E.eval_batch_size)
    feat_kw = dict(batch_size=eval_bs, device=device, mean_std=mean_std, amp=amp, progress=ctx.progress)
    grid = cfg.sk.grid
    epochs = int(E.epochs)
    sk_epochs = max(1, int(round(float(E.sk_epochs_frac) * epochs)))
    rows, curves, info_common = [], {}, {"train_fit": str(len(fit_idx)), "val": str(len(val_idx)),
                                        "test": str(len(y_test))}

    def fresh_backbone() -> nn.Module:
        torch.manual_seed(seed)  # readouts 1 and 4 start from the same initial weights
        return create_backbone(cfg.backbone, in_channels=in_channels)

    # ---- readout 1: linear head trained jointly with the backbone for E epochs
    backbone = fresh_backbone()
    init_state = copy.deepcopy(backbone.state_dict())
    torch.manual_seed(seed + 1)
    linear = nn.Linear(backbone.feature_dim, C)

    def eval_linear(epoch, entry):
        pred = predict(backbone, linear, x_test, **feat_kw)
        return {"test_acc": accuracy(pred, y_test)}

    hist1 = train_classifier(backbone, linear, x_fit, y_fit, epochs=epochs, augment=augment,
                             generator=ctx.generator(2), on_epoch_end=eval_linear if E.curves else None,
                             desc="1 linear+backbone", **common)
    acc1 = hist1[-1]["test_acc"] if E.curves else accuracy(predict(backbone, linear, x_test, **feat_kw), y_test)
    rows.append(_row("linear_joint", acc1, count_params(linear), epochs, hist1[-1]["train_s"] if hist1 else 0.0,
                     {"backbone": f"trained jointly, {epochs} epochs", **info_common}))
    if E.curves:
        curves["linear_joint"] = {"x": [h["epoch"] for h in hist1], "y": [h["test_acc"] for h in hist1]}
    ctx.log({"linear_joint/test_acc": acc1})

    # ---- frozen features of readout 1's backbone (shared by readouts 2, 3, 5)
    backbone.eval()
    backbone.requires_grad_(False)
    fingerprint = module_fingerprint(backbone)

    def features(name, x, idx):
        parts = {"kind": "cnn_readout_features", "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
                 "weights": fingerprint, "data": data.name, "split": name, "indices": tensor_fingerprint(idx),
                 "mean_std": mean_std, "in_channels": in_channels}
        return ctx.cache.get_or_compute(parts, lambda: extract_features(backbone, x, desc=f"features {name}", **feat_kw))

    t0 = time.perf_counter()
    f_fit, f_val, f_test = features("fit", x_fit, fit_idx), features("val", x_val, val_idx), features("test", x_test, test_keep)
    feature_s = time.perf_counter() - t0
    on = lambda t: t.to(device)  # noqa: E731

    # ---- readout 2: MLP head on the frozen features
    torch.manual_seed(seed + 3)
    hidden = int(E.mlp.hidden)
    mlp = nn.Sequential(nn.Linear(backbone.feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, C))
    hist2 = train_classifier(nn.Identity(), mlp, f_fit, y_fit, epochs=int(E.mlp.epochs), batch_size=int(E.mlp.batch_size),
                             lr=float(E.mlp.lr), device=device, optimizer="adam", weight_decay=float(E.mlp.weight_decay),
                             generator=ctx.generator(4), progress=ctx.progress, desc="2 mlp (frozen)")
    with torch.no_grad():
        mlp.eval()
        acc2 = accuracy(mlp(on(f_test)).argmax(1), y_test)
    rows.append(_row("mlp_frozen", acc2, count_params(mlp), int(E.mlp.epochs), hist2[-1]["train_s"] if hist2 else 0.0,
                     {"backbone": "frozen, from linear_joint", **info_common}, feature_s=feature_s))

    # ---- readout 3: SK on the frozen features, no training
    res3 = sk_readout(on(f_fit), on(y_fit), on(f_val), on(y_val), on(f_test), on(y_test), C, cfg.sk, grid)
    rows.append(_row("sk_frozen", res3.test_acc, 0, 0, 0.0,
                     {"chosen": _fmt_chosen(res3.chosen), "backbone": "frozen, from linear_joint", **info_common},
                     val_acc=res3.val_acc, select_s=res3.fit_s, predict_s=res3.predict_s, feature_s=feature_s))

    # ---- readout 5: DINO's weighted k-NN on the frozen features
    res5 = knn_probe(on(f_fit), on(y_fit), on(f_test), on(y_test), C, k=int(E.knn.k), temperature=float(E.knn.temperature))
    rows.append(_row("knn_frozen", res5.test_acc, 0, 0, 0.0,
                     {"chosen": _fmt_chosen(res5.chosen), "backbone": "frozen, from linear_joint", **info_common},
                     predict_s=res5.predict_s, feature_s=feature_s))
    if module_fingerprint(backbone) != fingerprint:
        raise RuntimeError("readout 1's backbone changed while the frozen readouts used it")

    # ---- readout 4: a fresh backbone trained end-to-end through an SK head for a fraction of E
    backbone4 = fresh_backbone()
    backbone4.load_state_dict(init_state)
    h = E.sk_head
    lengthscale = h.lengthscale if h.lengthscale == "auto" else float(h.lengthscale)
    head4 = SKHead(C, int(h.k), str(h.kernel), lengthscale, float(h.ridge), support=str(h.support),
                   bank_size=int(h.bank_size), normalize=bool(cfg.sk.get("normalize", True)),
                   learn_lengthscale=bool(h.learn_lengthscale))

    def eval_sk(epoch, entry):
        ff = extract_features(backbone4, x_fit, desc="sk support", **feat_kw)
        ft = extract_features(backbone4, x_test, desc="sk test", **feat_kw)
        return {"test_acc": sk_fixed_acc(on(ff), on(y_fit), on(ft), on(y_test), C, cfg.sk)}

    hist4 = train_classifier(backbone4, head4, x_fit, y_fit, epochs=sk_epochs, augment=augment,
                             head_forward=lambda hd, f, y: hd.training_step(f, y),
                             loss_fn=sk_loss(str(h.loss), float(h.logit_scale)), generator=ctx.generator(2),
                             on_epoch_end=eval_sk if E.curves else None, desc="4 backbone through SK", **common)
    g_fit = extract_features(backbone4, x_fit, desc="sk support", **feat_kw)
    g_val = extract_features(backbone4, x_val, desc="sk val", **feat_kw)
    g_test = extract_features(backbone4, x_test, desc="sk test", **feat_kw)
    res4 = sk_readout(on(g_fit), on(y_fit), on(g_val), on(y_val), on(g_test), on(y_test), C, cfg.sk, grid)
    rows.append(_row("sk_e2e", res4.test_acc, count_params(head4), sk_epochs, hist4[-1]["train_s"],
                     {"chosen": _fmt_chosen(res4.chosen), "support": str(h.support), "loss": str(h.loss),
                      "backbone": f"trained through SK, {sk_epochs} epochs", **info_common},
                     val_acc=res4.val_acc, select_s=res4.fit_s, predict_s=res4.predict_s))
    if E.curves:
        curves["sk_e2e"] = {"x": [e["epoch"] for e in hist4], "y": [e["test_acc"] for e in hist4]}
    ctx.log({"sk_e2e/test_acc": res4.test_acc})

    # ---- optional control: readout 1 with readout 4's budget
    if E.short_linear_control:
        backbone_s = fresh_backbone()
        backbone_s.load_state_dict(init_state)
        torch.manual_seed(seed + 1)
        linear_s = nn.Linear(backbone_s.feature_dim, C)
        hist_s = train_classifier(backbone_s, linear_s, x_fit, y_fit, epochs=sk_epochs, augment=augment,
                                  generator=ctx.generator(2), desc="1' linear+backbone, short", **common)
        acc_s = accuracy(predict(backbone_s, linear_s, x_test, **feat_kw), y_test)
        rows.append(_row("linear_joint_short", acc_s, count_params(linear_s), sk_epochs, hist_s[-1]["train_s"],
                         {"backbone": f"trained jointly, {sk_epochs} epochs", **info_common}))

    rows.sort(key=lambda r: READOUT_ORDER.index(r["keys"]["readout"]))  # the table lists readouts 1-5, then the control
    summary = {f"{r['keys']['readout']}_test_acc": r["metrics"]["test_acc"] for r in rows}
    summary["val_acc"] = res4.val_acc
    ctx.log(summary)
    return {"rows": rows, "curves": curves, "summary": summary}


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
