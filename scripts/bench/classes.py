"""Section 5: SK with integer labels at C=10 and C=1000 on the same data (the label path), and one
training step through an SK head against the neighbour search alone (also run by the GPU section)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sk

from .timing import device_timer, fmt_s, heading, interleaved_medians, log

CPU = torch.device("cpu")


def section(sizes: dict, threads: int) -> list[str]:
    return classes_lines(measure_classes(sizes["classes"])) + train_lines(measure_train_step(sizes["train"]), "###")


def measure_classes(cfg: dict, device: torch.device = CPU) -> dict:
    """SK with integer labels at each C on the same (z, x), and the one-hot path at the largest C."""
    g = torch.Generator().manual_seed(3)
    m, n, d, k = cfg["M"], cfg["N"], cfg["d"], cfg["k"]
    x = torch.randn(n, d, generator=g).to(device)
    z = torch.randn(m, d, generator=g).to(device)
    base = torch.randint(0, 1 << 30, (n,), generator=g).to(device)
    ls = sk.auto_lengthscale(x, k=k)
    fns = {}
    for c in cfg["Cs"]:
        fns[f"labels_{c}"] = (lambda c=c: sk.sparse_krr(z, x, base % c, k=k, lengthscale=ls, ridge=1e-3,
                                                        num_classes=c))
    cmax, cmin = max(cfg["Cs"]), min(cfg["Cs"])
    onehot = F.one_hot(base % cmax, cmax).float()
    fns[f"onehot_{cmax}"] = lambda: sk.sparse_krr(z, x, onehot, k=k, lengthscale=ls, ridge=1e-3)
    med, raw = interleaved_medians(fns, cfg["repeats"], device_timer(device))
    out = {"config": cfg, "median_s": med, "all_s": raw,
           "ratio": med[f"labels_{cmax}"] / med[f"labels_{cmin}"],
           "onehot_ratio": med[f"onehot_{cmax}"] / med[f"labels_{cmax}"]}
    log(f"classes: C={cmax} / C={cmin} = {out['ratio']:.3f}; one-hot / labels at C={cmax} = {out['onehot_ratio']:.2f}")
    return out


def measure_train_step(cfg: dict, device: torch.device = CPU) -> dict:
    """One training step through an SK head with a fixed support, against the neighbour search alone."""
    g = torch.Generator().manual_seed(4)
    n, d, b, k, c = cfg["N"], cfg["d"], cfg["batch"], cfg["k"], cfg["classes"]
    x = torch.randn(n, d, generator=g).to(device)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    z0 = torch.randn(b, d, generator=g).to(device)
    yb = torch.randint(0, c, (b,), generator=g).to(device)
    head = sk.SKClassifier(x, labels, num_classes=c, k=k, lengthscale="auto", ridge=1e-3).to(device)

    def step():  # z stands for a trainable encoder's output: the gradient goes back to it
        z = z0.clone().requires_grad_()
        F.cross_entropy(head(z), yb).backward()
        return z.grad

    def forward():
        with torch.no_grad():
            return head(z0)

    fns = {"step": step, "forward": forward, "search": lambda: sk.knn_search(z0, x, k)}
    med, raw = interleaved_medians(fns, cfg["repeats"], device_timer(device))
    out = {"config": cfg, "median_s": med, "all_s": raw, "ratio": med["step"] / med["search"],
           "forward_ratio": med["forward"] / med["search"]}
    log(f"training step: step / search = {out['ratio']:.2f}, forward / search = {out['forward_ratio']:.2f}")
    return out


def classes_lines(cl: dict) -> list[str]:
    c = cl["config"]
    cs = sorted(c["Cs"])
    about = (f"SK with integer labels (`sk.sparse_krr(z, x, labels, num_classes=C)`: one solve per point and a "
             f"scatter-add by label, no one-hot targets) on the same data at each C: M={c['M']}, N={c['N']}, "
             f"d={c['d']}, k={c['k']}, labels modulo C; and the one-hot path at C={cs[-1]} for comparison. Median "
             f"of {c['repeats']} interleaved repeats.")
    rows = [f"| integer labels | {cc} | {fmt_s(cl['median_s'][f'labels_{cc}'])} |" for cc in cs]
    rows.append(f"| one-hot targets | {cs[-1]} | {fmt_s(cl['median_s'][f'onehot_{cs[-1]}'])} |")
    summary = (f"**C={cs[-1]} / C={cs[0]}: {cl['ratio']:.3f}** (target <= 1.2); one-hot / labels at C={cs[-1]}: "
               f"{cl['onehot_ratio']:.2f}.")
    return heading("5. Number of classes, and a training step", about) + ["| path | C | SK s |", "|---|---|---|",
                                                                           *rows, "", summary, ""]


def train_lines(t: dict, heading: str = "##") -> list[str]:
    c = t["config"]
    med = t["median_s"]
    return [
        f"{heading} One training step",
        "",
        f"`sk.SKClassifier` head with a fixed support of N={c['N']} x d={c['d']} ({c['classes']} classes, integer "
        f"labels), batch {c['batch']}, k={c['k']}: forward + cross-entropy + backward to the batch (standing for "
        f"a trainable encoder's output), against the neighbour search of the batch alone. Median of {c['repeats']}.",
        "",
        "| step s | forward alone s | search alone s | step / search | forward / search |",
        "|---|---|---|---|---|",
        f"| {fmt_s(med['step'])} | {fmt_s(med['forward'])} | {fmt_s(med['search'])} | **{t['ratio']:.2f}** | "
        f"{t['forward_ratio']:.2f} |",
        "",
    ]
