"""Training-free transfer (issue 6): a frozen pretrained backbone plus SK on the target task's labels.

Claim tested: SK on frozen features transfers with no training at all, and is strongest when labels are
few. For each n in ``exp.shots`` labelled examples per class, one run (one seed) draws one labelled set
per n and reads the test set out with every probe the overlay names (experiments/core/probes):

- ``sk``: the SK classifier (no training); ``knn``: DINO's weighted k-NN (no training); ``ncm``: nearest
  class mean (no training); ``linear``: logistic regression (trained); ``finetune``: the backbone's last
  block (EfficientNet-Lite0: the last MBConv block and the head convolution; a timm ViT: the last
  transformer block and the final norm) and a new linear classifier, trained on the cached activations
  that enter the last block (backbones with ``split_last_block``).

One selection protocol for every probe: each probe with a setting (SK's k, kernel, lengthscale, ridge;
k-NN's k and T; the linear probe's C; fine-tuning's learning rate and steps) chooses it by stratified
``exp.cv_folds``-fold cross-validation over the labelled draw (the same folds for every probe: each
labelled example validated once, from a model that did not see it), then is refitted on the whole draw.
With one labelled example a class nothing can be validated: every probe takes its ``default``, fixed in
the config before any run (configs/probe/<name>.yaml; SK's: the ``sk`` group's fixed setting) from the
probe's own literature, touching no test image. Rows report the selection cost (``select_s``,
``settings_tried``) and the selection data (``selection``: the rule and a fingerprint of the folds, the
same for every probe of a draw); SK's rows also carry ``sk_grid`` (the sensitivity figure).

Settings (rows' ``setting`` key):
1. ``<backbone>-><data>``: the pretrained backbone (cfg.backbone; default EfficientNet-Lite0 with its
   packaged ImageNet weights) applied to cfg.data at the backbone's resolution and normalisation.
2. ``small_cnn[0-4]->fashion_mnist[5-9]`` (``exp.within``): a small CNN trained on Fashion-MNIST classes
   0-4 (once, with ``subset_seed``, cached), its frozen features read out on classes 5-9.

The labelled draws are nested (the n-shot set holds the first n images of a per-class permutation of
the pool drawn from the run seed) and one draw feeds every probe (``draw_labelled`` -> ``evaluate``).
``"all"`` (the whole pool) is the same set for every seed, so its seeds differ only by training noise:
the quick profile's largest n is half the pool instead, a different draw every seed. The pool (train
split) and the test images are fixed subsets, independent of the seed, and so are the cached features.
Every support set is checked to be disjoint from the test images (``assert_disjoint``). The table, its
comparisons and figures: experiments/reports/transfer.py.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from experiments.backbones import create
from experiments.core.cache import file_fingerprint, module_fingerprint, tensor_fingerprint
from experiments.core.config import probe_options
from experiments.core.data import load_dataset
from experiments.core.probes import ProbeTask, accuracy, row, run_probe, stratified_kfold
from experiments.core.train import extract_features, predict, train_classifier

SPLITS = ("train", "test")

ALL = "all"
DRAW_SEED = 7919  # offset of the labelled draws' generator (the run seed is added)
OBJECTIVES: tuple[str, ...] = ()  # no validation accuracy of a fixed SK setting: not a target of +hparams_search


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
    with_act = "finetune" in (cfg.get("probe") or {}) and hasattr(model, "split_last_block")
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


# ----------------------------------------------------------------------------- harness

def probe_task(bank: Bank, pos: torch.Tensor, folds: int, seed: int, device) -> ProbeTask:
    """What every probe sees at one labelled draw (positions ``pos`` into the pool): its features, the
    cross-validation folds over it, the test set, and the fine-tuning's activations where the bank has them."""
    y = bank.pool_y[pos]
    extras = {}
    if bank.pool_act is not None and bank.make_tail is not None:
        extras = {"act": bank.pool_act[pos], "test_act": bank.test_act, "make_tail": bank.make_tail}
    return ProbeTask(bank.pool_x[pos].to(device), y.to(device), bank.test_x.to(device), bank.test_y.to(device),
                     bank.num_classes, stratified_kfold(y, folds, seed), refit=True, seed=seed, device=device,
                     extras=extras)


def evaluate(bank: Bank, shots: list, options: dict[str, dict], folds: int, ctx) -> list[dict]:
    """Every probe (name -> its options) on the same labelled draw and folds, for every n; the table's rows."""
    rows = []
    for n, pos in draw_labelled(bank.pool_y, shots, ctx.seed).items():
        support_ids = bank.pool_idx[pos]
        assert_disjoint(bank.pool_split, support_ids, bank.test_split, bank.test_idx)
        task = probe_task(bank, pos, folds, ctx.seed, ctx.device)
        draw_id = tensor_fingerprint(support_ids)[:12]
        for name, opts in options.items():
            res = run_probe(name, task, opts)
            if res is None:
                continue
            r = row(name, res, {"setting": bank.setting, "shots": n, "method": name}, {"draw": draw_id, **bank.info})
            r["metrics"]["per_class"] = len(pos) / bank.num_classes
            rows.append(r)
            ctx.log({f"{bank.setting}/{name}/n={n}/test_acc": res.test_acc})
            print(f"[transfer] {bank.setting} n={n} {name}: {100 * res.test_acc:.2f}% "
                  f"(select {res.select_s:.2f} s, predict {res.predict_s:.2f} s) {res.info().get('chosen', '')}")
    return rows


def _shots(cfg) -> list:
    return [ALL if str(s) == ALL else int(s) for s in cfg.exp.shots]


def run(cfg, ctx) -> dict:
    options = probe_options(cfg)
    if not options:
        raise ValueError("no probes: the transfer overlay names them under `probe` (configs/exp/transfer.yaml)")
    shots = _shots(cfg)
    banks = [pretrained_bank(cfg, ctx)]
    if cfg.exp.within:
        banks.append(within_bank(cfg, ctx))
    rows = []
    for bank in banks:
        rows += evaluate(bank, shots, options, int(cfg.exp.cv_folds), ctx)
    summary = {}
    for r in rows:
        tag = "within" if r["keys"]["setting"] != banks[0].setting else "transfer"
        summary[f"{tag}/{r['keys']['method']}/n={r['keys']['shots']}"] = r["metrics"]["test_acc"]
    return {"rows": rows, "summary": summary}
