"""Section 7: small calls, one thread (an RL agent's SK head: 256 support points, d=256, k=16).

The time of one call with 1 and 64 queries, and of forward + backward to 64 queries, on a plain tensor
and on an ``sk.PrecomputedSupport`` (with and without its N x N distances); and, measured in the same
interleaved run, the same calls against ``minimal_krr``, a local KRR written here in a dozen lines with
no checks, the floor a small call can hope for, and against DINO's weighted k-NN vote at the same shape
(``dino_vote``, written plainly here, and the library's ``sk.weighted_knn``).
Once, before timing, SK is checked against the minimal at that shape (same neighbours, max abs
difference of outputs and gradients), so that the minimal is a fair reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sk

from .timing import heading, interleaved_medians, log, one_thread, ratio_spread, verdict_text

RIDGE = 1e-3
POOL = 32                     # query batches cycled through by the calls of one repeat
FORWARD_TARGET = 1.0          # SK's forward / the minimal's (issue 18)
GRAD_TARGET = 1.3             # SK's forward + backward to the queries / the minimal's (issue 18)


def section(sizes: dict, threads: int) -> list[str]:
    sm = one_thread(lambda: measure(sizes["small"]))
    return calls_lines(sm) + minimal_lines(sm)


def minimal_krr(z: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int, lengthscale: float,
                ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Local KRR with a Gaussian kernel in its plainest fast form: no checks, no chunks, no special cases.

    z (M, d), x (N, d), y (N, c) -> f (M, c) and the neighbours (M, k). Squared distances by one matmul,
    :math:`D = \lVert z\rVert^2 - 2 z x^\top + \lVert x\rVert^2` (M, N); the k smallest by topk; the
    neighbours gathered (``index_select``: on the CPU several times faster than ``x[idx]``); per query the
    neighbours' Gram :math:`K = \exp(-D_{II} / 2\ell^2)` (M, k, k) from one batched matmul, a batched
    Cholesky of :math:`K + \lambda I`, and :math:`f = k_z^\top (K + \lambda I)^{-1} Y_I`.
    """
    m = z.shape[0]
    x2 = (x * x).sum(1)
    d2z, idx = torch.addmm(x2, z, x.T, alpha=-2).add_((z * z).sum(1, keepdim=True)).topk(k, dim=1, largest=False)
    flat = idx.flatten()
    xg, x2g = x.index_select(0, flat).view(m, k, -1), x2.index_select(0, flat).view(m, k)
    d2xx = torch.baddbmm(x2g.unsqueeze(2) + x2g.unsqueeze(1), xg, xg.mT, alpha=-2)     # (M, k, k)
    gamma = -0.5 / lengthscale ** 2
    chol = torch.linalg.cholesky(torch.exp(gamma * d2xx) + ridge * torch.eye(k, dtype=x.dtype))
    alpha = torch.cholesky_solve(y.index_select(0, flat).view(m, k, -1), chol)           # (M, k, c)
    return (torch.exp(gamma * d2z).unsqueeze(1) @ alpha).squeeze(1), idx


def dino_vote(z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
              temperature: float = 0.07) -> torch.Tensor:
    r"""DINO's weighted k-NN vote (eval_knn.py's ``knn_classifier``) written plainly and differentiably, on
    unit-norm z (M, d) and x (N, d): cosine similarities by one matmul, topk, then
    :math:`\mathrm{score}_c(z) = \sum_{j \in \mathrm{kNN}(z)} \exp(s_j / T) [y_j = c]` (M, C)."""
    sims, idx = (z @ x.T).topk(k, dim=1)
    return sims.new_zeros(z.shape[0], num_classes).scatter_add(1, labels[idx], (sims / temperature).exp())


def setup(cfg: dict) -> dict:
    """Unit-norm support (N, d), regression targets (N, c), class labels for the vote, pools of fresh
    query batches of 1 and ``batch`` rows, and the three supports SK is called on."""
    g = torch.Generator().manual_seed(7)
    n, d, c, b = cfg["N"], cfg["d"], cfg["c"], cfg["batch"]
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    pool = {m: [F.normalize(torch.randn(m, d, generator=g), dim=1) for _ in range(POOL)] for m in (1, b)}
    supports = {"plain tensor": x, "PrecomputedSupport": sk.PrecomputedSupport(x),
                "PrecomputedSupport(distances=True)": sk.PrecomputedSupport(x, distances=True)}
    return {"x": x, "y": y, "labels": labels, "pool": pool, "supports": supports,
            "lengthscale": sk.auto_lengthscale(x, k=cfg["k"])}


def agreement(cfg: dict, s: dict) -> dict:
    """SK (each support) against the minimal on one batch: neighbour sets (the plain search's), and the
    max abs difference of the outputs and of the gradients of their sums to the queries."""
    k, ls, z0 = cfg["k"], s["lengthscale"], s["pool"][cfg["batch"]][0]

    def out_and_grad(fn):
        z = z0.clone().requires_grad_()
        f = fn(z)
        f.sum().backward()
        return f.detach(), z.grad

    f_min, g_min = out_and_grad(lambda z: minimal_krr(z, s["x"], s["y"], k, ls, RIDGE)[0])
    idx_min = minimal_krr(z0, s["x"], s["y"], k, ls, RIDGE)[1]
    idx_sk = sk.knn_search(z0, s["x"], k)[1]
    differ = int((idx_min.sort(1).values != idx_sk.sort(1).values).any(1).sum())
    paths = {}
    for name, xs in s["supports"].items():
        f, g = out_and_grad(lambda z: sk.sparse_krr(z, xs, s["y"], k=k, lengthscale=ls, ridge=RIDGE))
        paths[name] = {"f": float((f - f_min).abs().max()), "grad": float((g - g_min).abs().max())}
    return {"queries_with_other_neighbours": differ, "paths": paths, "f_scale": float(f_min.abs().max()),
            "grad_scale": float(g_min.abs().max())}


def timed_calls(cfg: dict, s: dict) -> dict:
    """The timed functions, keyed (path, case): SK on each support with 1 and ``batch`` queries and with
    forward + backward, the minimal and the vote likewise at ``batch``, and preparing a support. Each makes
    ``calls`` calls, each on the next batch of the pool (repeating one query would let the CPU's branch
    predictor learn the search's selection)."""
    k, ls, b, calls, y = cfg["k"], s["lengthscale"], cfg["batch"], cfg["calls"], s["y"]

    def nograd(fn, m):
        def run():
            with torch.no_grad():
                for j in range(calls):
                    fn(s["pool"][m][j % POOL])
        return run

    def grad(fn):
        def run():
            for j in range(calls):
                z = s["pool"][b][j % POOL].clone().requires_grad_()
                fn(z).sum().backward()
        return run

    fns = {}
    for name, xs in s["supports"].items():
        def run_sk(z, xs=xs):
            return sk.sparse_krr(z, xs, y, k=k, lengthscale=ls, ridge=RIDGE)
        fns.update({(name, "m1"): nograd(run_sk, 1), (name, f"m{b}"): nograd(run_sk, b),
                    (name, f"m{b}_grad"): grad(run_sk)})
    references = {"minimal": lambda z: minimal_krr(z, s["x"], y, k, ls, RIDGE)[0],
                  "dino_vote": lambda z: dino_vote(z, s["x"], s["labels"], cfg["c"], k),
                  "weighted_knn": lambda z: sk.weighted_knn(z, s["x"], s["labels"], cfg["c"], k=k, temperature=0.07)}
    for name, fn in references.items():
        fns.update({(name, f"m{b}"): nograd(fn, b), (name, f"m{b}_grad"): grad(fn)})
    x = s["x"]
    fns.update({("build", "plain"): lambda: [sk.PrecomputedSupport(x) for _ in range(calls)],
                ("build", "distances"): lambda: [sk.PrecomputedSupport(x, distances=True) for _ in range(calls)]})
    return fns


def measure(cfg: dict) -> dict:
    """Microseconds per call, median of interleaved repeats (call with one torch thread)."""
    s = setup(cfg)
    agree = agreement(cfg, s)
    log(f"small calls: SK against the minimal: {agree}")
    med, raw = interleaved_medians(timed_calls(cfg, s), cfg["repeats"])
    us = {key: 1e6 * v / cfg["calls"] for key, v in med.items()}
    b = cfg["batch"]
    spread = {(name, case): ratio_spread(raw[(name, case)], raw[("minimal", case)])
              for name in s["supports"] for case in (f"m{b}", f"m{b}_grad")}
    log("small calls: " + ", ".join(f"{a} {b_}: {v:.0f} us" for (a, b_), v in us.items()))
    return {"config": cfg, "us": us, "lengthscale": s["lengthscale"], "paths": list(s["supports"]),
            "agreement": agree, "spread": spread}


def calls_lines(sm: dict) -> list[str]:
    c, us, b = sm["config"], sm["us"], sm["config"]["batch"]
    out = heading(
        "7. Small calls (one thread)",
        f"An RL agent's SK head: N={c['N']} unit-norm support points, d={c['d']}, k={c['k']}, {c['c']} targets, "
        f"Gaussian kernel (lengthscale auto, {sm['lengthscale']:.3g}), ridge {RIDGE:g}. Microseconds per call, "
        f"median of {c['repeats']} interleaved repeats of {c['calls']} calls, each on fresh queries. `sk.sparse_krr(z, "
        "x, y)` with x a plain tensor, or an `sk.PrecomputedSupport` of it prepared once (its preparation is timed "
        "separately).") + [
        f"| support | 1 query, no grad (us) | {b} queries, no grad (us) | "
        f"{b} queries, forward + backward to them (us) |",
        "|---|---|---|---|",
    ]
    out += [f"| {name} | {us[(name, 'm1')]:.0f} | {us[(name, f'm{b}')]:.0f} | {us[(name, f'm{b}_grad')]:.0f} |"
            for name in sm["paths"]]
    return out + ["", f"Preparing the support: {us[('build', 'plain')]:.0f} us; with its N x N distances "
                  f"{us[('build', 'distances')]:.0f} us.", ""]


def minimal_lines(sm: dict) -> list[str]:
    c, us, b, agree = sm["config"], sm["us"], sm["config"]["batch"], sm["agreement"]
    fwd, grad = us[("minimal", f"m{b}")], us[("minimal", f"m{b}_grad")]
    out = [
        "### Against a minimal local KRR",
        "",
        f"`minimal_krr` in `scripts/bench/small.py`: squared distances by one matmul, topk, gather "
        "(`index_select`), the Gaussian "
        f"Gram of each query's neighbours by one batched matmul, a batched Cholesky, `cholesky_solve`, no checks. "
        f"M={b} queries, N={c['N']}, d={c['d']}, k={c['k']}, one thread; measured in the same interleaved run as "
        f"the table above (the SK forward times are its {b}-query column). Forward: no grad; forward + backward: "
        "the gradient of the outputs' sum to the queries (support fixed). A target is met when the ratio and "
        "the ratio within every interleaved repeat are within it, missed when none is, and \"at the target\" "
        "otherwise (the repeats' range is printed). The votes, DINO's weighted k-NN "
        f"(T=0.07) with k={c['k']} and {c['c']} classes: `dino_vote`, written plainly beside the minimal (one "
        "matmul, topk, exp(s / T) summed per class), and the library's `sk.weighted_knn`.",
        "",
        f"Check at this shape, one batch: SK's neighbours differ from the minimal's for "
        f"{agree['queries_with_other_neighbours']} of {b} queries; outputs up to {agree['f_scale']:.3g} in "
        f"size, gradients up to {agree['grad_scale']:.3g}.",
        "",
        "| SK path | max abs difference, outputs | max abs difference, gradients |",
        "|---|---|---|",
    ]
    out += [f"| {name} | {d['f']:.2e} | {d['grad']:.2e} |" for name, d in agree["paths"].items()]
    out += ["", "| call | forward us | forward / minimal | target | forward + backward us | "
            "forward + backward / minimal | target |", "|---|---|---|---|---|---|---|",
            f"| minimal local KRR | {fwd:.4g} | 1.000 | - | {grad:.4g} | 1.000 | - |"]
    for name in sm["paths"]:
        f, g = us[(name, f"m{b}")], us[(name, f"m{b}_grad")]
        sf, sg = sm["spread"][(name, f"m{b}")], sm["spread"][(name, f"m{b}_grad")]
        out.append(f"| SK, {name} | {f:.4g} | **{f / fwd:.3f}** | {verdict_text(f / fwd, sf, FORWARD_TARGET)} | "
                   f"{g:.4g} | **{g / grad:.3f}** | {verdict_text(g / grad, sg, GRAD_TARGET)} |")
    for key, label in (("dino_vote", "DINO-style vote, hand-written"), ("weighted_knn", "sk.weighted_knn")):
        f, g = us[(key, f"m{b}")], us[(key, f"m{b}_grad")]
        out.append(f"| {label} | {f:.4g} | {f / fwd:.3f} | - | {g:.4g} | {g / grad:.3f} | - |")
    return out + [""]
