"""Nonlinear probing of frozen ViT features (issue 5): SK against a linear and a k-NN probe, per block.

Claim under test: SK probes find information in frozen transformer features that a linear probe
misses, at a fraction of the linear probe's fitting cost.

1. Backbone. ``backbone=vit_tiny28`` (offline default): a small timm ViT for 28x28 images, pretrained
   here by a short seeded supervised recipe (``exp.pretrain``) on the TRAINING images of a few classes
   and cached (key: backbone config, recipe, fingerprint of the pretraining images). ``backbone=timm``:
   any pretrained timm ViT (hub or local ``checkpoint_path``), inputs resized to its ``img_size`` with its
   normalisation. vit_tiny28's pretraining seed is ``exp.pretrain.seed``, or the run seed when it is null
   (the quick profile: each seed is its own pretraining, so the seeds of a table cover the variation of
   the backbone as well as of the probe data).
2. Features. Every block's output, reduced to the CLS token and to the mean of the patch tokens, for all
   probe images, cached (key: weights fingerprint, images fingerprint, preprocessing).
3. Probe data (``exp.probe_split``). ``test``: the labelled and the test probe sets are both drawn from
   the data set's TEST split, which the pretraining never saw (the offline default, since the training
   split fed the pretraining). ``train_test``: labelled from the training split, tested on the test split
   (a backbone pretrained elsewhere, e.g. ImageNet -> CIFAR). ``auto``: ``test`` for vit_tiny28,
   ``train_test`` otherwise. The seed draws the labelled/test sets (``test``; subsets under
   ``train_test``) and the fit/validation split of the labelled set.
4. Probes, on identical features and splits: the overlay's ``probe`` entries (experiments/core/probes;
   default linear, k-NN and SK), every one choosing its setting on the same validation split of the
   labelled set (rule ``holdout``) and then refitted on all labelled examples. With ``exp.center`` the labelled set's mean feature is first subtracted from both sets
   (CL2N, Wang et al. 2019, "SimpleShot"): a block's tokens share a large common component that swamps
   cosine similarity; the linear probe standardises its inputs and is unaffected.
   Rows: {block, token, probe} -> test_acc, val_acc, select_s (seconds spent choosing the probe's
   hyperparameters on validation), settings_tried, fit_s, predict_s; info: chosen, selection (the data it
   chose on). SK's rows also carry ``sk_grid``: the validation accuracy of every setting of its grid (the
   sensitivity figure).
5. Headline: each probe's (block, token) is chosen by its validation accuracy, per seed, never by test
   accuracy (``summary[probe + "_selected_test_acc"]``). The table, its comparisons and figures:
   experiments/reports/vit_probe.py.

    python experiments/run.py -m +exp=vit_probe seed=0,1,2
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from experiments.backbones import create as create_backbone
from experiments.core.cache import module_fingerprint, tensor_fingerprint
from experiments.core.config import probe_options
from experiments.core.data import class_subset, load_dataset, train_val_split
from experiments.core.probes import ProbeTask, holdout, row, run_probe
from experiments.core.train import to_input, train_classifier

OBJECTIVES = ("val_acc",)  # SK's validation accuracy at the (block, token) it picks: what +hparams_search=sk_optuna maximises


# ----------------------------------------------------------------------------------------- backbone
def pretrain_tiny28(cfg, ctx, data):
    """vit_tiny28 pretrained by ``cfg.exp.pretrain`` on training images of its classes (cached).

    Returns (backbone in eval mode, info dict with the recipe's training accuracy and seconds).
    """
    recipe = OmegaConf.to_container(cfg.exp.pretrain, resolve=True)
    if recipe["seed"] is None:
        recipe["seed"] = ctx.seed
    x, y = class_subset(data.x_train, data.y_train, recipe["classes"])
    if recipe.get("per_class"):
        g = torch.Generator().manual_seed(int(recipe["seed"]))
        keep = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)]
                          [: int(recipe["per_class"])] for c in range(len(recipe["classes"]))]).sort().values
        x, y = x[keep], y[keep]
    parts = {"kind": "vit_tiny28_pretrain", "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
             "recipe": recipe, "data": data.name, "split": "train", "images": tensor_fingerprint(x),
             "labels": tensor_fingerprint(y), "mean_std": data.mean_std}

    def train():
        # Pretraining is fixed by the recipe's seed (the run seed when the recipe gives none).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(recipe["seed"]))
            backbone = create_backbone(cfg.backbone)
            head = nn.Linear(backbone.feature_dim, len(recipe["classes"]))
            history = train_classifier(
                backbone, head, x, y, epochs=int(recipe["epochs"]), batch_size=int(recipe["batch_size"]),
                lr=float(recipe["lr"]), device=ctx.device, mean_std=data.mean_std, channels=backbone.in_chans,
                size=backbone.img_size, optimizer="adamw",
                weight_decay=float(recipe["weight_decay"]), amp=bool(cfg.exp.amp),
                generator=torch.Generator().manual_seed(int(recipe["seed"])), progress=ctx.progress,
                desc="pretrain vit_tiny28")
        state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
        return {"state_dict": state, "history": history, "n_images": len(y)}

    entry = ctx.cache.get_or_compute(parts, train)
    backbone = create_backbone(cfg.backbone)
    backbone.load_state_dict(entry["state_dict"])
    last = entry["history"][-1] if entry["history"] else {}
    info = {"pretrain_train_acc": float(last.get("train_acc", float("nan"))),
            "pretrain_s": float(last.get("train_s", float("nan"))), "pretrain_images": int(entry["n_images"])}
    return backbone.eval(), info


def preprocess(x: torch.Tensor, backbone, mean_std, device) -> torch.Tensor:
    """uint8 images -> the backbone's input: normalised, channel-replicated, resized with its interpolation."""
    out = to_input(x, device, mean_std, channels=backbone.in_chans)
    if out.shape[-1] != backbone.img_size or out.shape[-2] != backbone.img_size:
        mode = backbone.interpolation if backbone.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        kw = {} if mode == "nearest" else {"align_corners": False, "antialias": out.shape[-1] > backbone.img_size}
        out = F.interpolate(out, size=(backbone.img_size, backbone.img_size), mode=mode, **kw)
    return out


@torch.no_grad()
def extract_block_features(backbone, x, *, mean_std, device, batch_size: int, amp: bool = False,
                           dtype: torch.dtype = torch.float32, progress=None, desc="features") -> dict:
    """{"cls"|"mean": (N, depth, D)} of uint8 images ``x`` on the CPU (``backbone.probe_features``)."""
    backbone.to(device).eval()
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    starts = range(0, len(x), batch_size)
    for s in (progress(starts, desc=desc, total=len(starts)) if progress else starts):
        xb = preprocess(x[s:s + batch_size], backbone, mean_std, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and torch.device(device).type == "cuda"):
            feats = backbone.probe_features(xb)
        for token, t in feats.items():
            parts[token].append(t.float().to(dtype).cpu())
    return {token: torch.cat(ts) for token, ts in parts.items()}


# ----------------------------------------------------------------------------------------- probes
def draw_probe_sets(split: str, n_train: int, n_test: int, n_lab, n_tst, generator):
    """Indices (labelled, test) of the seed's probe data; each a tensor into its source split."""
    if split == "test":
        n_tst = n_test // 2 if n_tst is None else int(n_tst)
        n_lab = n_test - n_tst if n_lab is None else int(n_lab)
        if n_lab + n_tst > n_test:
            raise ValueError(f"probe_labelled + probe_test = {n_lab + n_tst} exceeds the {n_test} held-out images")
        perm = torch.randperm(n_test, generator=generator)
        return perm[n_tst:n_tst + n_lab].sort().values, perm[:n_tst].sort().values
    lab = torch.randperm(n_train, generator=generator)[: n_lab or n_train].sort().values
    tst = torch.randperm(n_test, generator=generator)[: n_tst or n_test].sort().values
    return lab, tst


# ----------------------------------------------------------------------------------------- run
def run(cfg, ctx) -> dict:
    exp = cfg.exp
    data = load_dataset(cfg.data)
    info: dict = {}
    if cfg.backbone.name == "vit_tiny28":
        backbone, info = pretrain_tiny28(cfg, ctx, data)
    else:
        backbone = create_backbone(cfg.backbone).eval()
    split = str(exp.probe_split)
    if split == "auto":
        split = "test" if cfg.backbone.name == "vit_tiny28" else "train_test"
    if split not in ("test", "train_test"):
        raise ValueError(f"exp.probe_split must be auto, test or train_test, not {split!r}")
    if split == "train_test" and cfg.backbone.name == "vit_tiny28":
        raise ValueError("vit_tiny28 is pretrained on the training split: probe it with exp.probe_split=test")
    mean_std = backbone.mean_std or data.mean_std
    dtype = getattr(torch, str(exp.feature_dtype))
    weights = module_fingerprint(backbone)

    def features(name, x):
        parts = {"kind": "vit_probe_features", "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
                 "weights": weights, "data": data.name, "split": name, "images": tensor_fingerprint(x),
                 "preprocess": {"mean_std": mean_std, "img_size": backbone.img_size, "in_chans": backbone.in_chans,
                                "interpolation": backbone.interpolation},
                 "dtype": str(dtype), "amp": bool(exp.amp)}
        return ctx.cache.get_or_compute(parts, lambda: extract_block_features(
            backbone, x, mean_std=mean_std, device=ctx.device, batch_size=int(exp.batch_size), amp=bool(exp.amp),
            dtype=dtype, progress=ctx.progress, desc=f"features {name}"))

    test_feats = features("test", data.x_test)
    if split == "test":
        lab_feats, lab_y_all = test_feats, data.y_test
    else:
        lab_feats, lab_y_all = features("train", data.x_train), data.y_train

    g = ctx.generator()
    lab_idx, tst_idx = draw_probe_sets(split, len(data.y_train), len(data.y_test), exp.probe_labelled,
                                       exp.probe_test, g)
    fit_idx, val_idx = train_val_split(len(lab_idx), float(exp.val_frac), g)
    y_lab, y_test = lab_y_all[lab_idx].to(ctx.device), data.y_test[tst_idx].to(ctx.device)
    fit_idx, val_idx = fit_idx.to(ctx.device), val_idx.to(ctx.device)
    options = probe_options(cfg)
    selection = holdout(fit_idx, val_idx)

    tokens = [t for t in exp.tokens if t in test_feats]
    blocks = list(exp.blocks) if exp.get("blocks") else list(range(1, backbone.depth + 1))
    rows, curves = [], defaultdict(lambda: {"x": [], "y": []})
    jobs = [(b, t) for b in blocks for t in tokens]
    for b, t in ctx.progress(jobs, desc="probes", total=len(jobs)):
        x_lab = lab_feats[t][lab_idx, b - 1].float().to(ctx.device)
        x_test = test_feats[t][tst_idx, b - 1].float().to(ctx.device)
        if exp.center:
            mu = x_lab.mean(dim=0, keepdim=True)
            x_lab, x_test = x_lab - mu, x_test - mu
        task = ProbeTask(x_lab, y_lab, x_test, y_test, data.num_classes, selection, refit=True, seed=ctx.seed,
                         device=ctx.device)
        for name, opts in options.items():
            r = run_probe(name, task, opts)
            rows.append(row(name, r, {"block": b, "token": t, "probe": name}))
            curves[f"{name}-{t}"]["x"].append(b)
            curves[f"{name}-{t}"]["y"].append(r.test_acc)

    summary = summarize_rows(rows, list(options))
    summary.update(info)
    summary.update({"n_labelled": len(lab_idx), "n_test": len(tst_idx), "probe_split": split})
    ctx.log({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return {"rows": rows, "curves": dict(curves), "summary": summary}


def summarize_rows(rows: list[dict], probes: list[str]) -> dict:
    """Headline numbers: per probe the test accuracy at the (block, token) its validation accuracy picks
    (``<probe>_selected_test_acc``, the headline; ties: the first in row order) and that validation
    accuracy (``val_acc``: SK's, what an hparams search maximises), the best test accuracy over (block,
    token) (``<probe>_best_test_acc``: chosen on test, an upper bound, never a headline), and the total
    fitting and selection seconds over all probed features."""
    out: dict = {}
    for probe in probes:
        mine = [r for r in rows if r["keys"]["probe"] == probe]
        if not mine:
            continue
        out[f"{probe}_best_test_acc"] = max(r["metrics"]["test_acc"] for r in mine)
        picked = max(mine, key=lambda r: r["metrics"].get("val_acc", -1.0))
        out[f"{probe}_selected_test_acc"] = picked["metrics"]["test_acc"]
        out[f"{probe}_selected"] = f"block {picked['keys']['block']} {picked['keys']['token']}"
        out[f"{probe}_selected_val_acc"] = picked["metrics"].get("val_acc")
        out[f"{probe}_fit_s_total"] = sum(r["metrics"]["fit_s"] for r in mine)
        out[f"{probe}_select_s_total"] = sum(r["metrics"].get("select_s", 0.0) for r in mine)
    if "sk_selected_val_acc" in out:
        out["val_acc"] = out["sk_selected_val_acc"]
    if "linear_fit_s_total" in out and "sk_fit_s_total" in out:
        out["sk_over_linear_fit_s"] = out["sk_fit_s_total"] / max(out["linear_fit_s_total"], 1e-12)
        out["sk_over_linear_select_s"] = out["sk_select_s_total"] / max(out["linear_select_s_total"], 1e-12)
        out["sk_minus_linear_selected_acc"] = out["sk_selected_test_acc"] - out["linear_selected_test_acc"]
    return out
