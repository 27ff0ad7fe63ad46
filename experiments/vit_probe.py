"""Nonlinear probing of frozen ViT features (issue 5): SK against a linear and a k-NN probe, per block.

Claim under test: SK probes find information in frozen transformer features that a linear probe
misses, at a fraction of the linear probe's fitting cost.

1. Backbone. ``backbone=vit_tiny28`` (offline default): a small timm ViT for 28x28 images, pretrained
   here by a short seeded supervised recipe (``exp.pretrain``) on the TRAINING images of a few classes
   and cached (key: backbone config, recipe, fingerprint of the pretraining images). ``backbone=timm``:
   any pretrained timm ViT (hub or local ``checkpoint_path``), inputs resized to its ``img_size`` with its
   normalisation. The pretraining never depends on ``seed``.
2. Features. Every block's output, reduced to the CLS token and to the mean of the patch tokens, for all
   probe images, cached (key: weights fingerprint, images fingerprint, preprocessing).
3. Probe data (``exp.probe_split``). ``test``: the labelled and the test probe sets are both drawn from
   the data set's TEST split, which the pretraining never saw (the offline default, since the training
   split fed the pretraining). ``train_test``: labelled from the training split, tested on the test split
   (a backbone pretrained elsewhere, e.g. ImageNet -> CIFAR). ``auto``: ``test`` for vit_tiny28,
   ``train_test`` otherwise. The seed draws the labelled/test sets (``test``; subsets under
   ``train_test``) and the fit/validation split of the labelled set.
4. Probes, on identical features and splits (experiments.core.probes): linear (logistic regression, C
   chosen on validation then refitted on all labelled), k-NN (DINO: cosine, k=20, T=0.07, support = all
   labelled), SK (k, kernel, lengthscale, ridge chosen on the same validation split; support = all
   labelled). With ``exp.center`` the labelled set's mean feature is first subtracted from both sets
   (CL2N, Wang et al. 2019, "SimpleShot"): a block's tokens share a large common component that swamps
   cosine similarity; the linear probe standardises its inputs and is unaffected.
   Rows: {block, token, probe} -> test_acc, val_acc, select_s (seconds spent choosing the probe's
   hyperparameters on validation; 0 for k-NN), settings_tried, fit_s, predict_s; info: chosen. SK's rows
   also carry ``sk_grid``: the validation accuracy of every setting of its grid (the sensitivity figure).
5. Headline: each probe's (block, token) is chosen by its validation accuracy, per seed, never by test
   accuracy (``summary[probe + "_selected_test_acc"]``); ``comparisons(records)`` writes the numbers the
   README quotes under the table (differences and ranges over blocks, the validation-selected headline,
   the selection costs).

    python experiments/run.py -m +exp=vit_probe seed=0,1,2
"""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from experiments.backbones import create as create_backbone
from experiments.core.cache import module_fingerprint, tensor_fingerprint
from experiments.core.config import sk_options
from experiments.core.data import class_subset, load_dataset, train_val_split
from experiments.core.probes import knn_probe, linear_probe, sk_probe
from experiments.core.train import to_input, train_classifier

PROBES = ("linear", "knn", "sk")
OBJECTIVES = ("val_acc",)  # SK's validation accuracy at the (block, token) it picks: what +hparams_search=sk_optuna maximises


# ----------------------------------------------------------------------------------------- backbone
def pretrain_tiny28(cfg, ctx, data):
    """vit_tiny28 pretrained by ``cfg.exp.pretrain`` on training images of its classes (cached).

    Returns (backbone in eval mode, info dict with the recipe's training accuracy and seconds).
    """
    recipe = OmegaConf.to_container(cfg.exp.pretrain, resolve=True)
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
        # Pretraining is fixed by the recipe's seed: the run seed only draws probe data.
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
def run_probes(x_lab, y_lab, x_test, y_test, num_classes, fit_idx, val_idx, *, sk: dict, c_grid: list[float],
               max_iter: int, knn_k: int, knn_temperature: float) -> list:
    """The three probes on one feature set: same labelled set, same validation split, same test set.

    ``sk``: ``sk_probe``'s keyword arguments (``sk_options(cfg.sk)``); ``c_grid``, ``max_iter``: the linear
    probe's; ``knn_k``, ``knn_temperature``: the weighted k-NN's.
    """
    results = [
        linear_probe(x_lab, y_lab, x_test, y_test, num_classes, fit_idx, val_idx, c_grid=c_grid, max_iter=max_iter),
        knn_probe(x_lab, y_lab, x_test, y_test, num_classes, k=knn_k, temperature=knn_temperature),
        sk_probe(x_lab, y_lab, x_test, y_test, num_classes, fit_idx=fit_idx, val_idx=val_idx, **sk),
    ]
    # k-NN tunes nothing; its validation accuracy (fit part -> validation part) is reported for comparison.
    knn_val = knn_probe(x_lab[fit_idx], y_lab[fit_idx], x_lab[val_idx], y_lab[val_idx], num_classes,
                        k=knn_k, temperature=knn_temperature)
    results[1].val_acc = knn_val.test_acc
    return results


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
    probe_options = dict(sk=sk_options(cfg.sk), c_grid=[float(c) for c in exp.linear_c_grid],
                         max_iter=int(exp.linear_max_iter), knn_k=int(exp.knn_k),
                         knn_temperature=float(exp.knn_temperature))

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
        for r in run_probes(x_lab, y_lab, x_test, y_test, data.num_classes, fit_idx, val_idx, **probe_options):
            rows.append(r.row({"block": b, "token": t, "probe": r.name}))
            curves[f"{r.name}-{t}"]["x"].append(b)
            curves[f"{r.name}-{t}"]["y"].append(r.test_acc)

    summary = summarize_rows(rows)
    summary.update(info)
    summary.update({"n_labelled": len(lab_idx), "n_test": len(tst_idx), "probe_split": split})
    ctx.log({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return {"rows": rows, "curves": dict(curves), "summary": summary}


def summarize_rows(rows: list[dict]) -> dict:
    """Headline numbers: per probe the test accuracy at the (block, token) its validation accuracy picks
    (``<probe>_selected_test_acc``, the headline; ties: the first in row order) and that validation
    accuracy (``val_acc``: SK's, what an hparams search maximises), the best test accuracy over (block,
    token) (``<probe>_best_test_acc``: chosen on test, an upper bound, never a headline), and the total
    fitting and selection seconds over all probed features."""
    out: dict = {}
    for probe in PROBES:
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


# ----------------------------------------------------------------------------------------- comparisons
PROBE_LABELS = {"linear": "linear", "knn": "k-NN", "sk": "SK"}


def _feature_means(records: list[dict]) -> dict[tuple, dict[str, float]]:
    """{(block, token): {probe: test accuracy, mean over the records (seeds)}}."""
    vals: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        for row in rec["rows"]:
            k = row["keys"]
            vals[(int(k["block"]), str(k["token"]))][k["probe"]].append(row["metrics"]["test_acc"])
    return {fs: {p: sum(v) / len(v) for p, v in per.items()} for fs, per in vals.items()}


def _pts(v: float) -> str:
    """Accuracy points, two decimals, a true minus sign."""
    return f"{100 * v:.2f}".replace("-", "−")


def _difference_range(means: dict[tuple, dict[str, float]], a: str, b: str) -> str | None:
    diffs = {fs: m[a] - m[b] for fs, m in means.items() if a in m and b in m}
    if not diffs:
        return None
    lo, hi = min(diffs, key=diffs.get), max(diffs, key=diffs.get)
    return (f"{_pts(diffs[lo])}–{_pts(diffs[hi])} (smallest at block {lo[0]} {lo[1]}, "
            f"largest at block {hi[0]} {hi[1]})")


def comparisons(records: list[dict]) -> list[str]:
    """What the README quotes from one section of the table (``scripts/make_tables.py`` calls it).

    - (linear − SK) and (SK − k-NN) test accuracy over the probed (block, token) feature sets: the range
      of the per-feature-set means over seeds, in points;
    - per probe, the validation-selected headline: in each seed the (block, token) with the best
      validation accuracy, its test accuracy mean ± std over seeds, and which feature sets were chosen;
    - SK's selection cost against the linear probe's: seconds spent choosing hyperparameters on
      validation (``select_s``), summed over the feature sets, mean over seeds.
    """
    if not records:
        return []
    means = _feature_means(records)
    n = len(records)
    blocks = sorted({b for b, _ in means})
    tokens = sorted({t for _, t in means})
    where = (f"the {len(means)} feature sets ({len(blocks)} block{'s' if len(blocks) != 1 else ''} × "
             f"{len(tokens)} token{'s' if len(tokens) != 1 else ''}), each the mean over {n} seed{'s' if n != 1 else ''}")
    lines = []
    for a, b in (("linear", "sk"), ("sk", "knn")):
        span = _difference_range(means, a, b)
        if span:
            lines.append(f"- {PROBE_LABELS[a]} − {PROBE_LABELS[b]} test accuracy over {where}, in points: {span}")
    heads = []
    for probe in PROBES:
        picked = [summarize_rows(rec["rows"]) for rec in records]
        accs = [s[f"{probe}_selected_test_acc"] for s in picked if f"{probe}_selected_test_acc" in s]
        if not accs:
            continue
        chosen = Counter(s[f"{probe}_selected"] for s in picked if f"{probe}_selected" in s)
        which = ", ".join(f"{c} in {k} of {len(accs)}" for c, k in chosen.most_common())
        heads.append(f"{PROBE_LABELS[probe]} {100 * statistics.fmean(accs):.2f} ± {100 * _std(accs):.2f} % ({which})")
    if heads:
        lines.append(f"- Validation-selected headline (each seed's (block, token) with the best validation accuracy; "
                     f"test accuracy mean ± std over {n} seed{'s' if n != 1 else ''}): " + "; ".join(heads))
    cost = {}
    for probe in ("sk", "linear"):
        totals = [sum(r["metrics"].get("select_s", 0.0) for r in rec["rows"] if r["keys"]["probe"] == probe)
                  for rec in records]
        tried = [r["metrics"].get("settings_tried", 1) for rec in records for r in rec["rows"] if r["keys"]["probe"] == probe]
        if tried:
            cost[probe] = (statistics.fmean(totals), Counter(int(t) for t in tried).most_common(1)[0][0])
    if len(cost) == 2 and cost["linear"][0] > 0:
        (sk_s, sk_n), (lin_s, lin_n) = cost["sk"], cost["linear"]
        lines.append(f"- Selection cost (seconds choosing hyperparameters on the validation split, summed over the "
                     f"{len(means)} feature sets, mean over seeds): SK {sk_s:.3g} s ({sk_n} settings a feature set), "
                     f"linear {lin_s:.3g} s ({lin_n} values of C): SK {sk_s / lin_s:.2f}× the linear probe's")
    return lines


# ----------------------------------------------------------------------------------------- figure
def make_figure(records: list[dict], path: Path) -> None:
    """Test accuracy against depth (mean ± std over seeds), one line per probe and token type; one
    column of panels per profile, fitting seconds (log scale) underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_profile: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_profile[rec.get("profile", "default")].append(rec)
    profiles = sorted(by_profile, key=lambda p: (p != "quick", p != "paper", p))
    fig, axes = plt.subplots(2, len(profiles), figsize=(6 * len(profiles), 7), squeeze=False, sharex="col")
    colors = {"linear": "tab:blue", "knn": "tab:green", "sk": "tab:red"}
    styles = {"cls": "-", "mean": "--"}
    for col, profile in enumerate(profiles):
        recs = by_profile[profile]
        vals: dict[tuple, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        for rec in recs:
            for row in rec["rows"]:
                k = row["keys"]
                vals[(k["probe"], k["token"])][int(k["block"])].append(
                    (row["metrics"]["test_acc"], row["metrics"]["fit_s"]))
        for (probe, token), per_block in sorted(vals.items()):
            xs = sorted(per_block)
            for ax, j in ((axes[0, col], 0), (axes[1, col], 1)):
                mean = [sum(v[j] for v in per_block[b]) / len(per_block[b]) for b in xs]
                std = [_std([v[j] for v in per_block[b]]) for b in xs]
                if j == 0:
                    mean, std = [100 * m for m in mean], [100 * s for s in std]
                elif not any(m > 0 for m in mean):
                    continue  # k-NN fits nothing: no point on a log axis
                ax.plot(xs, mean, styles.get(token, ":"), color=colors.get(probe), marker="o", ms=3,
                        label=f"{probe} ({token})")
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colors.get(probe), alpha=0.12, lw=0)
        seeds = len({r.get("seed") for r in recs})
        model = recs[0]["config"]["backbone"].get("model") or recs[0]["config"]["backbone"]["name"]
        axes[0, col].set_title(f"{model} on {recs[0]['config']['data']['name']} ({profile}, {seeds} seed{'s' if seeds != 1 else ''})")
        axes[0, col].set_ylabel("test accuracy (%)")
        axes[1, col].set_ylabel("fit seconds (tuning + fit)")
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("block")
        axes[0, col].legend(fontsize=8, ncol=3)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _std(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
