"""Training-free transfer (issue 6): a frozen pretrained backbone plus SK on the target task's labels.

Claim tested: SK on frozen features transfers with no training at all, and is strongest when labels are
few. For n = 1, 5, 10, 50, 100 and all labelled examples per class, one run (one seed) draws one
labelled set per n and reads the test set out with

- ``sk``: the SK classifier (no training). Hyperparameters, with ``sk.tune=true`` (default): for
  n < ``exp.sk_tune_min_shots`` the fixed setting (``sk.k``, ``sk.kernel``, ``sk.lengthscale``,
  ``sk.ridge``), since a leave-one-out on one example a class removes the class; for larger n,
  leave-one-out over ``sk.grid`` on the labelled draw (free for a lazy method: each labelled point is
  predicted from its neighbours among the others). With ``sk.tune=false`` the fixed setting at every n.
  The row's ``chosen`` says which (``rule=fixed`` or ``rule=loo``).
- ``knn``: DINO's weighted k-NN (no training); ``ncm``: nearest class mean (no training);
- ``linear``: logistic regression (trained), C chosen from ``exp.linear_c_grid`` on a stratified
  validation split of the labelled draw, then refitted on the whole draw;
- ``finetune``: the backbone's last block (EfficientNet-Lite0: the last MBConv block and the head
  convolution; a timm ViT: the last transformer block and the final norm) and a new linear classifier,
  trained with Adam at a constant learning rate on the cached activations that enter the last block
  (backbones with ``split_last_block``). The learning rate and the number of steps are chosen from
  ``exp.finetune_lr_grid`` x ``exp.finetune_steps_grid`` on the same validation split as the linear
  probe's (one run per learning rate, scored at every step count of the grid), then the chosen setting
  is refitted on the whole draw.

The two trained baselines are chosen on a stratified validation split (``exp.val_frac`` of each class)
from ``exp.tune_min_shots`` labelled images a class; below it, where a split would leave a class without
examples on one side, they take their fixed defaults (``exp.linear_default_C``; ``exp.finetune_default_lr``
and ``exp.finetune_default_steps``), as SK takes its fixed setting below ``exp.sk_tune_min_shots``. Every
row reports its selection cost: ``select_s`` (seconds spent choosing the setting, every candidate's
training included; 0 for a fixed setting) and ``settings_tried`` (1 for a fixed setting); SK's rows also
carry ``sk_grid``, the leave-one-out accuracy of every setting of its grid (the sensitivity figure).

Settings (rows' ``setting`` key):
1. ``<backbone>-><data>``: the pretrained backbone (cfg.backbone; default EfficientNet-Lite0 with its
   packaged ImageNet weights) applied to cfg.data at the backbone's resolution and normalisation.
2. ``small_cnn[0-4]->fashion_mnist[5-9]`` (``exp.within``): a small CNN trained on Fashion-MNIST classes
   0-4 (once, with ``subset_seed``, cached), its frozen features read out on classes 5-9.

The labelled draws are nested (the n-shot set holds the first n images of a per-class permutation of
the pool drawn from the run seed) and one draw feeds every method (``draw_labelled`` -> ``evaluate``).
The pool (train split) and the test images are fixed subsets, independent of the seed, and so are the
cached features. Every support set is checked to be disjoint from the test images (``assert_disjoint``:
the bank records the source split and the index in it of every pool and test image, and a support image
with the same split and index as a test image stops the run).

``comparisons(records)`` writes what the README quotes under the table: SK against every other method at
every n (paired over seeds, with a bootstrap CI), fine-tuning minus SK at each n, and ranges.
"""
from __future__ import annotations

import copy
import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

import sk
from experiments.backbones import create
from experiments.core.cache import file_fingerprint, module_fingerprint, tensor_fingerprint
from experiments.core.config import sk_options
from experiments.core.data import load_dataset, train_val_split
from experiments.core.probes import (ProbeResult, accuracy, knn_probe, linear_probe, ncm_probe, paired_ci, sk_probe,
                                     tune_sk)
from experiments.core.train import extract_features, predict, train_classifier

SPLITS = ("train", "test")

ALL = "all"
DRAW_SEED = 7919  # offset of the labelled draws' generator (the run seed is added)
OBJECTIVES: tuple[str, ...] = ()  # no validation accuracy of a fixed SK setting: not a target of +hparams_search
METHOD_ORDER = ["sk", "knn", "ncm", "linear", "finetune"]
BOOTSTRAP_REPS = 2_000  # replicates of each paired CI in ``comparisons`` (rliable's percentile bootstrap)


# ----------------------------------------------------------------------------- data subsets and draws

def fixed_subset(labels: torch.Tensor, per_class: int | None, seed: int, classes=None) -> torch.Tensor:
    """Sorted indices of ``per_class`` images of each class (of ``classes``, default all), seeded."""
    classes = sorted(int(c) for c in (classes if classes is not None else labels.unique().tolist()))
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        if per_class is not None:
            if per_class > len(idx):
                raise ValueError(f"class {c} has {len(idx)} images, fewer than the {per_class} asked for")
            idx = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        out.append(idx)
    return torch.cat(out).sort().values


def draw_labelled(labels: torch.Tensor, shots: list, seed: int) -> dict[Any, torch.Tensor]:
    """The labelled set of every n in ``shots``: sorted positions into ``labels`` (the pool).

    One per-class permutation is drawn from ``seed``; the n-shot set is the first n of each class
    (so the sets are nested). ``"all"`` is the whole pool. This is the single source of labelled sets:
    every method at a given (n, seed) gets the same one.
    """
    g = torch.Generator().manual_seed(DRAW_SEED + int(seed))
    perms = {int(c): (labels == c).nonzero().flatten() for c in labels.unique().tolist()}
    perms = {c: idx[torch.randperm(len(idx), generator=g)] for c, idx in sorted(perms.items())}
    draws = {}
    for n in shots:
        if n == ALL:
            draws[ALL] = torch.arange(len(labels))
            continue
        n = int(n)
        small = min(len(p) for p in perms.values())
        if n < 1 or n > small:
            raise ValueError(f"cannot draw {n} labelled images a class from a pool with {small} in its smallest class")
        draws[n] = torch.cat([p[:n] for p in perms.values()]).sort().values
    return draws


def assert_disjoint(support_split: str, support_idx: torch.Tensor, test_split: str, test_idx: torch.Tensor) -> None:
    """Raise if a test image is in the support set: the same index into the same source split.

    Images of different splits (the train pool, the test images) are different images; two sets drawn
    from one split share an image exactly when they share an index.
    """
    for split in (support_split, test_split):
        if split not in SPLITS:
            raise ValueError(f"unknown source split {split!r}: expected one of {SPLITS}")
    if support_split != test_split:
        return
    common = torch.isin(support_idx, test_idx)
    if bool(common.any()):
        raise AssertionError(f"{int(common.sum())} test images are in the support set, e.g. {support_split} "
                             f"image {int(support_idx[common][0])}")


def split_images(data, split: str) -> torch.Tensor:
    """The images of ``data``'s source ``split`` ("train" or "test"): the one place a bank reads images."""
    if split not in SPLITS:
        raise ValueError(f"unknown source split {split!r}: expected one of {SPLITS}")
    return data.x_train if split == "train" else data.x_test


def split_labels(data, split: str) -> torch.Tensor:
    return data.y_train if split == "train" else data.y_test


def _at_least(n, threshold: int) -> bool:
    return n == ALL or int(n) >= threshold


# ----------------------------------------------------------------------------- features

@dataclass
class Bank:
    """Cached features of one setting: the labelled pool and the test images, each with its source split
    ("train" or "test") and the index of every image in that split."""

    setting: str
    num_classes: int
    pool_x: torch.Tensor
    pool_y: torch.Tensor
    pool_split: str
    pool_idx: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_split: str
    test_idx: torch.Tensor
    pool_act: torch.Tensor | None = None  # activations entering the last block (fine-tuning)
    test_act: torch.Tensor | None = None
    make_tail: Callable[[], nn.Module] | None = None  # a fresh trainable copy of the last block + pooling
    info: dict[str, str] = field(default_factory=dict)


def input_spec(model: nn.Module, cfg_backbone, data) -> dict[str, Any]:
    """Preprocessing a backbone expects: its normalisation, channels and resolution."""
    mean_std = getattr(model, "mean_std", None) or data.mean_std
    return {"mean_std": [list(mean_std[0]), list(mean_std[1])],
            "channels": int(getattr(model, "in_chans", None) or cfg_backbone.get("in_chans", 3) or 3),
            "size": getattr(model, "img_size", None) or cfg_backbone.get("img_size")}


def weights_fingerprint(model: nn.Module) -> str:
    path = getattr(model, "weights_path", None)
    return file_fingerprint(path) if path is not None else module_fingerprint(model)


ACT_CHUNK = 8192  # images a chunk of the activation extraction (converted to act_dtype chunk by chunk)


def backbone_features(model, data, ids: torch.Tensor, split: str, spec: dict, with_act: bool,
                      cfg, ctx, key: dict) -> dict[str, torch.Tensor]:
    """{"feats": (N, d)[, "act": activations entering the last block]} of the images ``ids`` of ``data``'s
    source ``split``, cached. The activations are kept in ``exp.act_dtype`` (float16 halves a ViT's)."""
    act_dtype = getattr(torch, str(cfg.exp.act_dtype))
    parts = {"kind": "transfer_features", **key, "split": split, "ids": ids, "preprocess": spec, "act": with_act,
             **({"act_dtype": str(act_dtype)} if with_act else {})}

    def compute():
        kw = dict(batch_size=int(cfg.exp.batch_size), device=ctx.device, mean_std=spec["mean_std"],
                  channels=spec["channels"], size=spec["size"], amp=bool(cfg.exp.amp), progress=ctx.progress)
        x = split_images(data, split)[ids]
        if not with_act:
            return {"feats": extract_features(model, x, desc=f"{split} features", **kw)}
        trunk, tail = model.split_last_block()
        act = torch.cat([extract_features(trunk, x[s:s + ACT_CHUNK], desc=f"{split} trunk", **kw).to(act_dtype)
                         for s in range(0, len(x), ACT_CHUNK)])
        tail.to(ctx.device).eval()
        with torch.no_grad():
            feats = torch.cat([tail(act[s:s + kw["batch_size"]].to(ctx.device).float()).float().cpu()
                               for s in range(0, len(act), kw["batch_size"])])
        return {"feats": feats, "act": act}

    return ctx.cache.get_or_compute(parts, compute)


def pretrained_bank(cfg, ctx) -> Bank:
    data = load_dataset(cfg.data)
    model = create(cfg.backbone).to(ctx.device).eval()
    spec = input_spec(model, cfg.backbone, data)
    with_act = "finetune" in cfg.exp.methods and hasattr(model, "split_last_block")
    key = {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True), "weights": weights_fingerprint(model),
           "data": data.name}
    seed = int(cfg.exp.subset_seed)
    pool_idx = fixed_subset(data.y_train, cfg.exp.pool_per_class, seed)
    test_idx = fixed_subset(data.y_test, cfg.exp.test_per_class, seed + 1)
    pool_split, test_split = "train", "test"
    pool = backbone_features(model, data, pool_idx, pool_split, spec, with_act, cfg, ctx, key)
    test = backbone_features(model, data, test_idx, test_split, spec, with_act, cfg, ctx, key)

    def make_tail():
        return copy.deepcopy(model).split_last_block()[1]

    return Bank(setting=f"{cfg.backbone.name}->{data.name}", num_classes=data.num_classes,
                pool_x=pool["feats"], pool_y=split_labels(data, pool_split)[pool_idx], pool_split=pool_split,
                pool_idx=pool_idx, test_x=test["feats"], test_y=split_labels(data, test_split)[test_idx],
                test_split=test_split, test_idx=test_idx,
                pool_act=pool.get("act"), test_act=test.get("act"), make_tail=make_tail if with_act else None,
                info={"img_size": str(spec["size"]), "feature_dim": str(pool["feats"].shape[1])})


def within_bank(cfg, ctx) -> Bank:
    """small_cnn trained on the source classes (fixed seed, cached); features of the target classes."""
    e = cfg.exp
    data = load_dataset(e.data_within)
    cfg_bb = e.backbone_within
    seed = int(e.subset_seed)
    src, tgt = list(e.within_source_classes), list(e.within_target_classes)
    train_idx = fixed_subset(data.y_train, e.within_train_per_class, seed, classes=src)
    remap = {c: i for i, c in enumerate(src)}
    y_src = torch.tensor([remap[int(c)] for c in data.y_train[train_idx]])
    train_cfg = {"epochs": int(e.within_epochs), "batch_size": int(e.within_batch_size), "lr": float(e.within_lr),
                 "seed": seed}
    parts = {"kind": "transfer_cnn", "backbone": OmegaConf.to_container(cfg_bb, resolve=True), "data": data.name,
             "classes": src, "ids": train_idx, "train": train_cfg, "mean_std": data.mean_std}

    def train():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cnn = create(cfg_bb)
            head = nn.Linear(cnn.feature_dim, len(src))
        t0 = time.perf_counter()
        train_classifier(cnn, head, data.x_train[train_idx], y_src, epochs=train_cfg["epochs"],
                         batch_size=train_cfg["batch_size"], lr=train_cfg["lr"], device=ctx.device,
                         mean_std=data.mean_std, generator=torch.Generator().manual_seed(seed),
                         progress=ctx.progress, desc="within cnn")
        train_s = time.perf_counter() - t0
        src_test = fixed_subset(data.y_test, None, seed, classes=src)
        y_test = torch.tensor([remap[int(c)] for c in data.y_test[src_test]])
        pred = predict(cnn, head, data.x_test[src_test], batch_size=512, device=ctx.device,
                       mean_std=data.mean_std, progress=ctx.progress)
        return {"state": {k: v.cpu() for k, v in cnn.state_dict().items()}, "source_test_acc": accuracy(pred, y_test),
                "train_s": train_s}

    trained = ctx.cache.get_or_compute(parts, train)
    cnn = create(cfg_bb)
    cnn.load_state_dict(trained["state"])
    cnn.to(ctx.device).eval()
    spec = {"mean_std": [list(data.mean_std[0]), list(data.mean_std[1])], "channels": None, "size": None}
    key = {"backbone": parts["backbone"], "weights": module_fingerprint(cnn), "data": data.name}
    pool_idx = fixed_subset(data.y_train, e.pool_per_class, seed, classes=tgt)
    test_idx = fixed_subset(data.y_test, e.test_per_class, seed + 1, classes=tgt)
    pool = backbone_features(cnn, data, pool_idx, "train", spec, False, cfg, ctx, key)
    test = backbone_features(cnn, data, test_idx, "test", spec, False, cfg, ctx, key)
    tmap = torch.full((int(data.y_train.max()) + 1,), -1, dtype=torch.long)
    tmap[torch.tensor(tgt)] = torch.arange(len(tgt))
    name = f"{cfg_bb.name}[{_span(src)}]->{data.name}[{_span(tgt)}]"
    return Bank(setting=name, num_classes=len(tgt), pool_x=pool["feats"], pool_y=tmap[data.y_train[pool_idx]],
                pool_split="train", pool_idx=pool_idx, test_x=test["feats"], test_y=tmap[data.y_test[test_idx]],
                test_split="test", test_idx=test_idx,
                info={"source_test_acc": f"{trained['source_test_acc']:.4f}", "cnn_train_s": f"{trained['train_s']:.1f}"})


def _span(classes) -> str:
    c = sorted(int(x) for x in classes)
    return f"{c[0]}-{c[-1]}" if c == list(range(c[0], c[-1] + 1)) else ",".join(map(str, c))


# ----------------------------------------------------------------------------- methods

@dataclass
class Task:
    """One labelled draw of one setting: what every method sees."""

    n: Any
    support_ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    seed: int
    act: torch.Tensor | None = None
    test_act: torch.Tensor | None = None
    make_tail: Callable[[], nn.Module] | None = None


def sk_loo_tune(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, k: list[int], kernel: list[str],
                lengthscale_mult: list[float], ridge: list[float], max_points: int, generator: torch.Generator,
                backend: str = "torch", scores: list | None = None) -> tuple[dict[str, Any], float]:
    """Leave-one-out choice of (k, kernel, lengthscale multiple, ridge) on the labelled set alone.

    Each of at most ``max_points`` labelled points (a random subset; every labelled point stays in the
    support) is predicted by ``sk.sparse_krr`` from its nearest neighbours among the *other* labelled
    points: one ``sk.knn_search`` for k_max + 1 neighbours, the point itself removed, serves every grid
    entry (``tune_sk`` with these ``indices``; k is capped at n - 1). The best grid entry wins (ties: the
    first in grid order). ``x`` is already normalised as SK will see it. ``scores``: a list that receives
    every grid setting's leave-one-out accuracy (as ``val_acc``; ``tune_sk``'s ``scores``).
    """
    n = len(x)
    q = torch.randperm(n, generator=generator)[:max_points].to(x.device) if n > max_points else torch.arange(n, device=x.device)
    k_max = min(max(int(v) for v in k), n - 1)
    with torch.no_grad():
        _, idx = sk.knn_search(x[q], x, k_max + 1, backend=backend)
    drop = idx == q[:, None]
    drop[~drop.any(1), -1] = True  # self beyond the k_max + 1 nearest (duplicates): drop the farthest instead
    idx = idx[~drop].view(len(q), k_max)
    return tune_sk(x, y, x[q], y[q], num_classes, k=k, kernel=kernel, lengthscale_mult=lengthscale_mult,
                   ridge=ridge, backend=backend, indices=idx, scores=scores)


def run_sk(task: Task, *, device, sk_kw: dict, tune_min_shots: int, loo_points: int) -> ProbeResult:
    """SK on the labelled draw. ``sk_kw``: ``sk_options(cfg.sk)``. With a grid (``sk.tune=true``) and
    n >= ``tune_min_shots`` the setting is chosen by leave-one-out on the draw (rule ``loo``); otherwise
    (``sk.tune=false``, or fewer shots: a leave-one-out on one example a class removes the class) the
    fixed setting is used (rule ``fixed``). With the leave-one-out, ``select_s`` is its time,
    ``settings_tried`` the grid's size and ``grid`` every setting's leave-one-out accuracy."""
    x, y = task.x.to(device), task.y.to(device)
    setting = {**sk_kw, "grid": None}
    t0 = time.perf_counter()
    loo_acc, rule, scores = None, "fixed", None
    if sk_kw["grid"] is not None and _at_least(task.n, tune_min_shots):
        xn = F.normalize(x.float(), dim=1) if sk_kw["normalize"] else x.float()
        scores = []
        chosen, loo_acc = sk_loo_tune(xn, y, task.num_classes, max_points=loo_points,
                                      generator=torch.Generator().manual_seed(task.seed), backend=sk_kw["backend"],
                                      scores=scores, **sk_kw["grid"])
        setting.update(chosen)
        rule = "loo"
    tune_s = time.perf_counter() - t0  # tune_sk reads every score back to the CPU: synchronised
    res = sk_probe(x, y, task.test_x.to(device), task.test_y.to(device), task.num_classes, **setting)
    res.fit_s += tune_s  # SK fits nothing: the time is the hyperparameter choice
    res.val_acc = loo_acc
    res.chosen = {"rule": rule, **res.chosen}
    if scores is not None:
        res.select_s, res.settings_tried, res.grid = tune_s, len(scores), scores
    return res


def run_knn(task: Task, *, device, k: int, temperature: float) -> ProbeResult:
    return knn_probe(task.x.to(device), task.y.to(device), task.test_x.to(device), task.test_y.to(device),
                     task.num_classes, k=k, temperature=temperature)


def run_ncm(task: Task, *, device) -> ProbeResult:
    return ncm_probe(task.x.to(device), task.y.to(device), task.test_x.to(device), task.test_y.to(device),
                     task.num_classes)


def validation_split(task: Task, val_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The stratified fit/validation split of a draw on which the trained baselines choose their setting:
    one split per (draw, seed), the same for the linear probe and the fine-tuning."""
    return train_val_split(len(task.y), val_frac, torch.Generator().manual_seed(task.seed), stratify=task.y)


def run_linear(task: Task, *, device, tune_min_shots: int, val_frac: float, default_C: float, c_grid: list[float],
               max_iter: int) -> ProbeResult:
    """Logistic regression; C chosen on the validation split of the draw from n >= ``tune_min_shots``
    (``linear_probe``: then refitted on the whole draw), ``default_C`` below."""
    if _at_least(task.n, tune_min_shots):
        fit, val = validation_split(task, val_frac)
        grid, rule = c_grid, "val"
    else:  # one C: the split is not used to choose anything
        fit = val = torch.arange(len(task.y))
        grid, rule = [default_C], "fixed"
    res = linear_probe(task.x.to(device), task.y.to(device), task.test_x.to(device), task.test_y.to(device),
                       task.num_classes, fit.to(device), val.to(device), c_grid=grid, max_iter=max_iter)
    res.chosen = {"rule": rule, **res.chosen}
    if rule == "fixed":  # linear_probe's "selection" fitted the one C on the whole draw: not a choice, and not the final fit
        res.val_acc = None
        res.fit_s -= res.select_s
        res.select_s, res.settings_tried = 0.0, 1
    return res


def finetune_runs(act: torch.Tensor, y: torch.Tensor, make_tail: Callable[[], nn.Module], num_classes: int,
                  feature_dim: int, *, lr: float, checkpoints: list[int], batch_size: int, weight_decay: float,
                  seed: int, device) -> Any:
    """One fine-tuning run of a fresh tail and a new linear classifier on activations ``act`` (N, ...):
    Adam at the constant learning rate ``lr``, a random batch of ``batch_size`` examples a step (all of
    them when fewer). Yields ``(steps, model)`` after each step count of ``checkpoints`` (ascending), so
    that one run scores every step count; ``model`` maps activations to logits (in eval mode: the
    pretrained batch-norm statistics stay, few-shot batches are tiny). ``seed`` fixes the classifier's
    initialisation and the batches."""
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


def run_finetune(task: Task, *, device, shots: list, tune_min_shots: int, val_frac: float, lr_grid: list[float],
                 steps_grid: list[int], default_lr: float, default_steps: int, batch_size: int,
                 weight_decay: float) -> ProbeResult | None:
    """Fine-tune the last block + a new linear classifier on the cached activations, at the n in ``shots``.

    From n >= ``tune_min_shots``: (learning rate, steps) chosen from ``lr_grid`` x ``steps_grid`` by
    accuracy on the draw's validation split (``validation_split``, the linear probe's), training on the
    rest; one run per learning rate scored at every step count (``finetune_runs``); ties go to the first
    learning rate in grid order, then the fewest steps. Then the chosen setting is trained on the whole
    draw. Below ``tune_min_shots``: ``default_lr`` and ``default_steps``.
    """
    if task.make_tail is None or task.act is None:
        return None
    if str(task.n) not in {str(s) for s in shots}:
        return None
    run = functools.partial(finetune_runs, make_tail=task.make_tail, num_classes=task.num_classes,
                            feature_dim=int(task.x.shape[1]), batch_size=batch_size, weight_decay=weight_decay,
                            seed=task.seed, device=device)
    select_s, tried, val_acc = 0.0, 1, None
    if _at_least(task.n, tune_min_shots):
        t0 = time.perf_counter()
        fit, val = validation_split(task, val_frac)
        act_fit, y_fit, act_val, y_val = task.act[fit], task.y[fit], task.act[val], task.y[val]
        best = None
        for lr in lr_grid:
            for steps, model in run(act_fit, y_fit, lr=float(lr), checkpoints=steps_grid):
                acc = accuracy(finetune_predict(model, act_val, device), y_val)  # on the CPU: synchronised
                if best is None or acc > best[0] + 1e-12:
                    best = (acc, float(lr), steps)
        val_acc, lr, steps = best
        select_s, tried, rule = time.perf_counter() - t0, len(lr_grid) * len(steps_grid), "val"
    else:
        lr, steps, rule = float(default_lr), int(default_steps), "fixed"
    t0 = time.perf_counter()
    (_, model), = list(run(task.act, task.y, lr=lr, checkpoints=[steps]))
    if torch.device(device).type == "cuda":  # the optimiser's last step is queued, not done
        torch.cuda.synchronize(device)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = finetune_predict(model, task.test_act, device)
    return ProbeResult("finetune", accuracy(pred, task.test_y), val_acc, select_s + fit_s, time.perf_counter() - t0,
                       {"rule": rule, "lr": lr, "steps": steps}, pred, select_s=select_s, settings_tried=tried)


METHODS: dict[str, Callable[..., ProbeResult | None]] = {
    "sk": run_sk, "knn": run_knn, "ncm": run_ncm, "linear": run_linear, "finetune": run_finetune}


def method_options(cfg) -> dict[str, dict[str, Any]]:
    """Each method's keyword arguments, read from the config (the only place the methods' knobs are read)."""
    e = cfg.exp
    return {
        "sk": {"sk_kw": sk_options(cfg.sk), "tune_min_shots": int(e.sk_tune_min_shots),
               "loo_points": int(e.sk_loo_points)},
        "knn": {"k": int(e.knn_k), "temperature": float(e.knn_temperature)},
        "ncm": {},
        "linear": {"tune_min_shots": int(e.tune_min_shots), "val_frac": float(e.val_frac),
                   "default_C": float(e.linear_default_C), "c_grid": [float(c) for c in e.linear_c_grid],
                   "max_iter": int(e.linear_max_iter)},
        "finetune": {"shots": list(e.finetune_shots), "tune_min_shots": int(e.tune_min_shots),
                     "val_frac": float(e.val_frac), "lr_grid": [float(v) for v in e.finetune_lr_grid],
                     "steps_grid": [int(v) for v in e.finetune_steps_grid],
                     "default_lr": float(e.finetune_default_lr), "default_steps": int(e.finetune_default_steps),
                     "batch_size": int(e.finetune_batch_size), "weight_decay": float(e.finetune_weight_decay)},
    }


# ----------------------------------------------------------------------------- harness

def evaluate(bank: Bank, shots: list, methods: dict[str, Callable[[Task], ProbeResult | None]], ctx) -> list[dict]:
    """Every method (name -> ``method(task)``, its options bound) on the same labelled draw, for every n;
    rows of the table."""
    rows = []
    draws = draw_labelled(bank.pool_y, shots, ctx.seed)
    for n, pos in draws.items():
        support_ids = bank.pool_idx[pos]
        assert_disjoint(bank.pool_split, support_ids, bank.test_split, bank.test_idx)
        act = None if bank.pool_act is None else bank.pool_act if n == ALL else bank.pool_act[pos]
        task = Task(n=n, support_ids=support_ids, x=bank.pool_x[pos], y=bank.pool_y[pos], test_x=bank.test_x,
                    test_y=bank.test_y, num_classes=bank.num_classes, seed=ctx.seed, act=act,
                    test_act=bank.test_act, make_tail=bank.make_tail)
        draw_id = tensor_fingerprint(support_ids)[:12]
        for name, method in methods.items():
            res = method(task)
            if res is None:
                continue
            row = res.row({"setting": bank.setting, "shots": n, "method": name}, {"draw": draw_id, **bank.info})
            row["metrics"]["per_class"] = len(pos) / bank.num_classes
            rows.append(row)
            ctx.log({f"{bank.setting}/{name}/n={n}/test_acc": res.test_acc})
            print(f"[transfer] {bank.setting} n={n} {name}: {100 * res.test_acc:.2f}% "
                  f"(fit {res.fit_s:.2f} s, predict {res.predict_s:.2f} s) {res.info().get('chosen', '')}")
    return rows


def _shots(cfg) -> list:
    return [ALL if str(s) == ALL else int(s) for s in cfg.exp.shots]


def run(cfg, ctx) -> dict:
    unknown = set(cfg.exp.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: known are {METHOD_ORDER}")
    options = method_options(cfg)
    methods = {m: functools.partial(METHODS[m], device=ctx.device, **options[m])
               for m in METHOD_ORDER if m in cfg.exp.methods}
    shots = _shots(cfg)
    banks = [pretrained_bank(cfg, ctx)]
    if cfg.exp.within:
        banks.append(within_bank(cfg, ctx))
    rows = []
    for bank in banks:
        usable = methods if bank.make_tail else {m: f for m, f in methods.items() if m != "finetune"}
        rows += evaluate(bank, shots, usable, ctx)
    summary = {}
    for r in rows:
        tag = "within" if r["keys"]["setting"] != banks[0].setting else "transfer"
        summary[f"{tag}/{r['keys']['method']}/n={r['keys']['shots']}"] = r["metrics"]["test_acc"]
    return {"rows": rows, "summary": summary}


# ----------------------------------------------------------------------------- figure

def make_figure(records: list[dict], path: Path) -> None:
    """Test accuracy against labelled examples per class, one panel per setting, mean ± std over seeds."""
    import statistics

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc: dict[tuple, list[float]] = {}
    xpos: dict[tuple, float] = {}
    for rec in records:
        for row in rec["rows"]:
            k = row["keys"]
            key = (k["setting"], k["method"], str(k["shots"]))
            acc.setdefault(key, []).append(100 * row["metrics"]["test_acc"])
            xpos[key] = row["metrics"].get("per_class", float(k["shots"]) if k["shots"] != ALL else float("nan"))
    settings = sorted({k[0] for k in acc})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method in [m for m in METHOD_ORDER if any(k[0] == setting and k[1] == m for k in acc)]:
            keys = sorted((k for k in acc if k[0] == setting and k[1] == method), key=lambda k: xpos[k])
            xs = [xpos[k] for k in keys]
            ys = [statistics.fmean(acc[k]) for k in keys]
            err = [statistics.stdev(acc[k]) if len(acc[k]) > 1 else 0.0 for k in keys]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method,
                        linestyle="-" if method in ("sk", "knn", "ncm") else "--")
        ticks = sorted({(xpos[k], k[2]) for k in acc if k[0] == setting})
        ax.set_xscale("log")
        ax.set_xticks([t[0] for t in ticks])
        ax.set_xticklabels([t[1] if t[1] != ALL else f"all\n({t[0]:.0f})" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled examples per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="solid: no training, dashed: trained", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------- comparisons (README)

METHOD_LABELS = {"sk": "SK", "knn": "k-NN", "ncm": "NCM", "linear": "linear", "finetune": "fine-tuning"}


def _points(v: float, signed: bool = True) -> str:
    """A difference of accuracies (fractions) in points, two decimals, with a true minus sign."""
    return (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}").replace("-", "−")


def _span_points(values: list[float]) -> str:
    """``lo–hi`` in points (en dash; a negative end keeps its minus sign); one value when they agree."""
    lo, hi = _points(min(values), signed=False), _points(max(values), signed=False)
    return lo if lo == hi else f"{lo}–{hi}"


def _by_seed(records: list[dict]) -> dict[tuple, dict[int, float]]:
    """{(setting, shots, method): {seed: test accuracy}} over the records (one per seed)."""
    out: dict[tuple, dict[int, float]] = {}
    for rec in records:
        for row in rec["rows"]:
            k = row["keys"]
            out.setdefault((k["setting"], str(k["shots"]), k["method"]), {})[rec.get("seed")] = row["metrics"]["test_acc"]
    return out


def _shots_order(shots: str) -> tuple:
    return (1, 0) if shots == ALL else (0, int(shots))


def comparisons(records: list[dict]) -> list[str]:
    """What the README quotes from one section of the table (``scripts/make_tables.py`` calls it).

    Per setting: at every n, SK minus each other method in points, mean over the seeds where both ran
    (the same labelled draw: paired) with a 95% bootstrap CI over those seeds; fine-tuning minus SK at
    each n; the range over n of SK minus each method.
    """
    acc = _by_seed(records)
    lines = [f"- Differences in test accuracy, in points: mean over the seeds (one labelled draw each, shared by "
             f"every method) with a 95% percentile bootstrap CI of the paired per-seed differences (rliable, "
             f"{BOOTSTRAP_REPS:,} replicates)."]
    settings = list(dict.fromkeys(k[0] for k in acc))
    for setting in settings:
        shots = sorted({k[1] for k in acc if k[0] == setting}, key=_shots_order)
        methods = [m for m in METHOD_ORDER if m != "sk" and any(k[0] == setting and k[2] == m for k in acc)]
        diffs: dict[str, dict[str, float]] = {m: {} for m in methods}
        for n in shots:
            sk_acc = acc.get((setting, n, "sk"))
            if not sk_acc:
                continue
            parts = []
            for m in methods:
                other = acc.get((setting, n, m), {})
                seeds = sorted(set(sk_acc) & set(other), key=str)
                if not seeds:
                    continue
                mean, lo, hi = paired_ci([sk_acc[s] - other[s] for s in seeds], reps=BOOTSTRAP_REPS)
                diffs[m][n] = mean
                ci = f" [{_points(lo)}, {_points(hi)}]" if math.isfinite(lo) else " (one seed: no CI)"
                parts.append(f"SK − {METHOD_LABELS[m]} {_points(mean)}{ci}")
            per_class = _per_class(records, setting, n)
            label = f"{n} shot{'s' if n != '1' else ''} a class" if n != ALL else f"all ({per_class} a class)"
            lines.append(f"- `{setting}`, {label}, {len(sk_acc)} seed{'s' if len(sk_acc) != 1 else ''}: " + "; ".join(parts))
        if diffs.get("finetune"):
            per_n = ", ".join(f"{_points(-v)} ({n})" for n, v in sorted(diffs["finetune"].items(), key=lambda kv: _shots_order(kv[0])))
            lines.append(f"- `{setting}`, fine-tuning − SK at each n (shots a class in brackets), in points: {per_n}")
        ranges = [f"{METHOD_LABELS[m]} {_span_points(list(d.values()))} (over n = {', '.join(sorted(d, key=_shots_order))})"
                  for m, d in diffs.items() if d]
        if ranges:
            lines.append(f"- `{setting}`, range of SK − method over n, in points: " + "; ".join(ranges))
    return lines


def _per_class(records: list[dict], setting: str, n: str) -> str:
    vals = [row["metrics"].get("per_class") for rec in records for row in rec["rows"]
            if row["keys"]["setting"] == setting and str(row["keys"]["shots"]) == n]
    vals = [v for v in vals if v is not None]
    return f"{statistics.fmean(vals):.0f}" if vals else "?"
