"""Section 6: Fashion-MNIST raw pixels, training-free: SK (k, lengthscale, ridge, kernel picked on a
validation split) against DINO's weighted k-NN and exact KRR on a subset.

The data come from the experiments' loader (``experiments.core.data.load_fashion_mnist``): the IDX files
in ``$SK_DATA`` (default ``./data``) directly, in ``fashion-mnist/`` or in torchvision's layout, then
Debian's ``/usr/share/datasets/fashion-mnist``; nothing is downloaded.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

import sk
from experiments.core.data import DataNotFoundError, load_fashion_mnist, to_float

from .provenance import ROOT
from .timing import fmt_s, heading, log, timed


def section(sizes: dict, threads: int) -> list[str]:
    return lines(measure(sizes["fashion"]))


def load() -> list[torch.Tensor]:
    """[x_train, y_train, x_test, y_test]: pixels in [0, 1] flattened to (n, 784), int64 labels."""
    data = load_fashion_mnist(os.environ.get("SK_DATA", ROOT / "data"))
    flat = [to_float(data.x_train).flatten(1), data.y_train, to_float(data.x_test).flatten(1), data.y_test]
    log(f"fashion: data from {data.source}")
    return flat


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(1) == labels).float().mean())


def onehot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, 10).float()


def select_sk(cfg: dict, x_sup, y_sup, x_val, y_val) -> dict:
    """SK's grid on the validation split: one search, reused for every setting through indices=."""
    t_search, (_, idx_val) = timed(lambda: sk.knn_search(x_val, x_sup, max(cfg["ks"])))
    log(f"fashion: validation search {t_search:.1f}s")
    autos = {k: sk.auto_lengthscale(x_sup, k=k) for k in cfg["ks"]}
    grid, t0 = [], time.perf_counter()
    for kernel in cfg["kernels"]:
        for k in cfg["ks"]:
            for mult in cfg["mults"]:
                for ridge in cfg["ridges"]:
                    f = sk.sparse_krr(x_val, x_sup, onehot(y_sup), k=k, kernel=kernel,
                                      lengthscale=mult * autos[k], ridge=ridge, indices=idx_val)
                    grid.append({"kernel": kernel, "k": k, "mult": mult, "ridge": ridge,
                                 "val_acc": accuracy(f, y_val)})
    best = max(grid, key=lambda r: r["val_acc"])
    log(f"fashion: grid of {len(grid)} in {time.perf_counter() - t0:.1f}s, best {best}")
    return {"grid": grid, "best": best, "grid_s": time.perf_counter() - t0, "autos": autos}


def test_sk_and_knn(best: dict, x_sup, y_sup, x_test, y_test) -> tuple[float, float, float, float, float]:
    """SK with the chosen setting (its lengthscale multiplier applied to this support's auto value) and
    DINO's weighted k-NN (k=20, T=0.07): (SK accuracy, SK s, k-NN accuracy, k-NN s, SK lengthscale)."""
    ls = best["mult"] * sk.auto_lengthscale(x_sup, k=best["k"])
    t_sk, f = timed(lambda: sk.sparse_krr(x_test, x_sup, onehot(y_sup), k=best["k"], kernel=best["kernel"],
                                           lengthscale=ls, ridge=best["ridge"]))
    t_knn, scores = timed(lambda: sk.weighted_knn(x_test, x_sup, y_sup, 10, k=20, temperature=0.07))
    return accuracy(f, y_test), t_sk, accuracy(scores, y_test), t_knn, ls


def exact_krr(cfg: dict, x_sup, y_sup, x_val, y_val, x_all, y_all, x_test, y_test) -> dict:
    """Exact KRR (Gaussian): lengthscale and ridge picked on a small subset, then fit on a larger one."""
    n_sel = cfg["exact_select_n"]
    auto_sel = sk.auto_lengthscale(x_sup[:n_sel], k=32)
    egrid = []
    for mult in cfg["exact_mults"]:
        for ridge in cfg["exact_ridges"]:
            f = sk.exact_krr(x_val, x_sup[:n_sel], onehot(y_sup[:n_sel]), kernel="gaussian",
                             lengthscale=mult * auto_sel, ridge=ridge)
            egrid.append({"mult": mult, "ridge": ridge, "val_acc": accuracy(f, y_val)})
    ebest = max(egrid, key=lambda r: r["val_acc"])
    log(f"fashion: exact KRR selection on {n_sel}: {ebest}")
    n_ex = cfg["exact_n"]
    x_ex, y_ex = x_all[:n_ex], y_all[:n_ex]
    ls_ex = ebest["mult"] * sk.auto_lengthscale(x_ex, k=32)
    t_ex, f = timed(lambda: sk.exact_krr(x_test, x_ex, onehot(y_ex), kernel="gaussian", lengthscale=ls_ex,
                                         ridge=ebest["ridge"]))
    log(f"fashion: exact KRR on {n_ex}: test acc {accuracy(f, y_test):.4f} ({t_ex:.1f}s)")
    return dict(exact_grid=egrid, exact_best=ebest, exact_n=n_ex, exact_test_acc=accuracy(f, y_test),
                exact_test_s=t_ex, exact_lengthscale=ls_ex)


def measure(cfg: dict) -> dict:
    try:
        x_train, y_train, x_test, y_test = load()
    except DataNotFoundError as e:
        return {"skipped": f"Skipped: {e}"}
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    if cfg["n_support"]:
        perm = perm[: cfg["n_support"] + cfg["n_val"]]
    if cfg["n_test"]:
        x_test, y_test = x_test[: cfg["n_test"]], y_test[: cfg["n_test"]]
    val_idx, sup_idx = perm[: cfg["n_val"]], perm[cfg["n_val"]:]
    x_sup, y_sup, x_val, y_val = x_train[sup_idx], y_train[sup_idx], x_train[val_idx], y_train[val_idx]
    x_all, y_all = x_train[perm], y_train[perm]
    res = {"config": cfg, "n_support_select": len(x_sup), "n_val": len(x_val), "n_support_test": len(x_all),
           "n_test": len(x_test), **select_sk(cfg, x_sup, y_sup, x_val, y_val)}
    best = res["best"]
    # Test: support = all training points (validation included), the chosen setting.
    (res["sk_test_acc"], res["sk_test_s"], res["knn_test_acc"], res["knn_test_s"],
     res["sk_test_lengthscale"]) = test_sk_and_knn(best, x_all, y_all, x_test, y_test)
    log(f"fashion: SK test acc {res['sk_test_acc']:.4f}, DINO weighted k-NN {res['knn_test_acc']:.4f}")
    res.update(exact_krr(cfg, x_sup, y_sup, x_val, y_val, x_all, y_all, x_test, y_test))
    # SK and the k-NN vote with their own settings on exact KRR's subset: a like-for-like comparison.
    n_ex = res["exact_n"]
    (res["sk_subset_test_acc"], res["sk_subset_test_s"], res["knn_subset_test_acc"], res["knn_subset_test_s"],
     _) = test_sk_and_knn(best, x_all[:n_ex], y_all[:n_ex], x_test, y_test)
    log(f"fashion: on the {n_ex} subset: SK {res['sk_subset_test_acc']:.4f}, k-NN {res['knn_subset_test_acc']:.4f}")
    return res


def lines(fm: dict) -> list[str]:
    out = heading("6. Fashion-MNIST, raw pixels in [0, 1] (training-free)")
    if "skipped" in fm:
        return out + [fm["skipped"], ""]
    b, eb = fm["best"], fm["exact_best"]
    n_all, n_ex = fm["n_support_test"], fm["exact_n"]
    out += [
        f"Selection: {fm['n_val']} validation points held out of the training set (seeded), support = the "
        f"other {fm['n_support_select']}; grid kernel x k x lengthscale multiplier (of "
        "sk.auto_lengthscale(support, k)) x ridge, one search reused through indices=. Test: support = all "
        f"{n_all} training points, {fm['n_test']} test points.",
        "",
        f"Chosen SK setting: kernel {b['kernel']}, k={b['k']}, lengthscale {b['mult']} x auto = "
        f"{fm['sk_test_lengthscale']:.3g}, ridge {b['ridge']:g} (validation accuracy {b['val_acc']:.4f}). "
        f"Exact KRR: Gaussian, lengthscale {eb['mult']} x auto = {fm['exact_lengthscale']:.3g}, "
        f"ridge {eb['ridge']:g}, picked on a {fm['config']['exact_select_n']}-point subset "
        f"(validation accuracy {eb['val_acc']:.4f}).",
        "",
        "| method | support | test accuracy | time s |",
        "|---|---|---|---|",
        f"| SK ({b['kernel']}, k={b['k']}) | {n_all} | **{fm['sk_test_acc']:.4f}** | {fmt_s(fm['sk_test_s'])} |",
        f"| DINO weighted k-NN (k=20, T=0.07) | {n_all} | {fm['knn_test_acc']:.4f} | {fmt_s(fm['knn_test_s'])} |",
        f"| exact KRR (Gaussian) | {n_ex} | {fm['exact_test_acc']:.4f} | {fmt_s(fm['exact_test_s'])} |",
        f"| SK, same setting | {n_ex} | {fm['sk_subset_test_acc']:.4f} | {fmt_s(fm['sk_subset_test_s'])} |",
        f"| DINO weighted k-NN | {n_ex} | {fm['knn_subset_test_acc']:.4f} | {fmt_s(fm['knn_subset_test_s'])} |",
        "",
        "<details><summary>Validation grid</summary>",
        "",
        "| kernel | k | lengthscale mult | ridge | val acc |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {g['kernel']} | {g['k']} | {g['mult']} | {g['ridge']:g} | {g['val_acc']:.4f} |" for g in fm["grid"]]
    out += ["", "| exact KRR lengthscale mult | ridge | val acc |", "|---|---|---|"]
    out += [f"| {g['mult']} | {g['ridge']:g} | {g['val_acc']:.4f} |" for g in fm["exact_grid"]]
    return out + ["", "</details>", ""]
