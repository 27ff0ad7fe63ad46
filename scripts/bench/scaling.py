"""Section 3: SK against exact KRR (torch Cholesky) and scikit-learn's KernelRidge at growing N: time,
test error, log-log scaling exponents."""
from __future__ import annotations

import numpy as np
import torch

import sk

from .timing import fmt_s, heading, interleaved_medians, log, timed

NAMES = {"sk_s": "SK", "exact_s": "exact KRR", "sklearn_s": "scikit-learn"}


def section(sizes: dict, threads: int) -> list[str]:
    return lines(measure(sizes["scaling"]))


def target_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * torch.pi * x[:, 0]) + torch.cos(2 * torch.pi * x[:, 1]) + 2 * x[:, 2] * x[:, 3]


def rel_err(f: torch.Tensor, ref: torch.Tensor) -> float:
    return float((f - ref).norm() / ref.norm())


def measure(cfg: dict) -> dict:
    from sklearn.kernel_ridge import KernelRidge

    g = torch.Generator().manual_seed(1)
    d, ls, lam, k = cfg["d"], cfg["lengthscale"], cfg["ridge"], cfg["k"]
    z = torch.rand(cfg["M"], d, generator=g)
    fz = target_fn(z)
    data = {}
    for n in cfg["Ns"]:
        x = torch.rand(n, d, generator=g)
        data[n] = (x, target_fn(x) + 0.1 * torch.randn(n, generator=g))

    def run_sk(n):
        x, y = data[n]
        return sk.sparse_krr(z, x, y, k=k, kernel="gaussian", lengthscale=ls, ridge=lam)

    # SK is fast: its repeats alternate over the sizes, so that a burst of load elsewhere hits all alike.
    sk_med, _ = interleaved_medians({n: (lambda n=n: run_sk(n)) for n in cfg["Ns"]}, cfg["repeats"])
    rows = []
    for n in cfg["Ns"]:
        x, y = data[n]
        f_sk = run_sk(n)
        row = {"N": n, "sk_s": sk_med[n]}
        log(f"scaling N={n}: SK {row['sk_s']:.3f}s")
        row["exact_s"], f_ex = timed(lambda: sk.exact_krr(z, x, y, kernel="gaussian", lengthscale=ls, ridge=lam))
        log(f"scaling N={n}: exact KRR {row['exact_s']:.2f}s")
        row.update(sk_rel_err=rel_err(f_sk, fz), exact_rel_err=rel_err(f_ex, fz), sk_vs_exact=rel_err(f_sk, f_ex))
        if n <= cfg["sklearn_max_n"]:
            def fit_predict():
                model = KernelRidge(alpha=lam, kernel="rbf", gamma=1.0 / (2 * ls ** 2)).fit(x.numpy(), y.numpy())
                return torch.from_numpy(model.predict(z.numpy()))
            row["sklearn_s"], f_skl = timed(fit_predict)
            row["sklearn_rel_err"] = rel_err(f_skl.float(), fz)
            log(f"scaling N={n}: scikit-learn {row['sklearn_s']:.2f}s")
        rows.append(row)
    slopes = {}
    for key in NAMES:
        pts = [(r["N"], r[key]) for r in rows if key in r]
        if len(pts) >= 2:
            slopes[key] = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])
    return {"config": cfg, "rows": rows, "slopes": slopes}


def lines(s: dict) -> list[str]:
    c = s["config"]
    out = heading(
        "3. SK versus exact KRR and scikit-learn",
        f"Synthetic regression: x ~ U[0,1]^{c['d']}, y = sin(2 pi x1) + cos(2 pi x2) + 2 x3 x4 + 0.1 noise; "
        f"M={c['M']} test points; Gaussian kernel, lengthscale {c['lengthscale']}, ridge {c['ridge']}; SK with "
        f"k={c['k']}. Error: ||f - f*|| / ||f*|| against the noiseless target on the test points. SK time is the "
        f"median of {c['repeats']} (search included, repeats alternating over N); exact KRR (torch Cholesky, "
        "float32) and scikit-learn KernelRidge (kernel='rbf', gamma=1/(2 l^2), float32 input) are single runs "
        "(fit + predict).") + [
        "| N | SK s | exact KRR s | scikit-learn s | exact / SK | SK error | exact error | sklearn error | "
        "SK vs exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in s["rows"]:
        skl_s = fmt_s(row["sklearn_s"]) if "sklearn_s" in row else "not run"
        skl_e = f"{row['sklearn_rel_err']:.4f}" if "sklearn_rel_err" in row else "-"
        out.append(f"| {row['N']} | {fmt_s(row['sk_s'])} | {fmt_s(row['exact_s'])} | {skl_s} | "
                   f"{row['exact_s'] / row['sk_s']:.1f}x | {row['sk_rel_err']:.4f} | {row['exact_rel_err']:.4f} | "
                   f"{skl_e} | {row['sk_vs_exact']:.4f} |")
    last = s["rows"][-1]
    return out + [
        "", "Fitted scaling exponents (slope of log time on log N): "
        + ", ".join(f"{NAMES[k]} {v:.2f}" for k, v in s["slopes"].items()) + ".", "",
        f"**At N={last['N']} SK is {last['exact_s'] / last['sk_s']:.1f}x faster than exact KRR** (target >= 20x).", ""]
