#!/usr/bin/env python
"""Benchmark of the sk library on this machine; writes a Markdown report (results/bench_sk.md).

    .venv/bin/python scripts/bench_sk.py --out results/bench_sk.md        # full, ~10-15 min on 2 cores
    .venv/bin/python scripts/bench_sk.py --quick --out /tmp/bench.md      # tiny smoke version

Sections, all measured in this process (the memory case in a fresh subprocess):
1. SK versus a plain chunked k-NN vote with the same search (M=4000, N=20000, d=256, k=32, float32).
2. The neighbour search's FLOP rate against the machine's measured matmul rate.
3. SK against exact KRR (torch Cholesky) and scikit-learn's KernelRidge at N = 5k, 10k, 20k: time,
   test error, log-log scaling exponents.
4. Peak memory of SK at M=50k, N=100k, d=64, k=16 (VmHWM of a subprocess minus its RSS with inputs).
5. Fashion-MNIST raw pixels: training-free SK (k, lengthscale, ridge, kernel picked on a validation
   split) against DINO's weighted k-NN and exact KRR on a subset.

Every number in the report is measured by this script; the report is written atomically at the end.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sk  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

FULL = dict(
    ratio=dict(M=4000, N=20000, d=256, k=32, classes=10, repeats=7),
    matmul=dict(n=2048, repeats=3),
    scaling=dict(Ns=[5000, 10000, 20000], M=2000, d=8, k=32, lengthscale=0.5, ridge=1e-2, repeats=5,
                 sklearn_max_n=20000),
    memory=dict(M=50000, N=100000, d=64, k=16, classes=10),
    fashion=dict(n_val=5000, n_support=None, n_test=None, ks=[8, 16, 32, 64, 128], mults=[0.5, 1.0, 2.0],
                 ridges=[1e-3, 1e-1], kernels=["gaussian", "laplacian"], exact_select_n=5000,
                 exact_n=20000, exact_mults=[0.5, 1.0, 2.0, 4.0], exact_ridges=[1e-3, 1e-1]),
)
QUICK = dict(
    ratio=dict(M=200, N=1000, d=32, k=8, classes=5, repeats=2),
    matmul=dict(n=256, repeats=2),
    scaling=dict(Ns=[250, 500, 1000], M=200, d=4, k=16, lengthscale=0.5, ridge=1e-2, repeats=1,
                 sklearn_max_n=1000),
    memory=dict(M=2000, N=5000, d=16, k=8, classes=5),
    fashion=dict(n_val=300, n_support=2000, n_test=300, ks=[8, 16], mults=[1.0], ridges=[1e-1],
                 kernels=["gaussian"], exact_select_n=500, exact_n=1000, exact_mults=[1.0], exact_ridges=[1e-1]),
)


def log(msg: str) -> None:
    print(f"[bench_sk {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function; one warm-up each, then the functions alternate per repeat so
    that slow drifts of a shared machine hit them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    return {name: statistics.median(ts) for name, ts in times.items()}, times


# -- machine -------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    for name in ("faiss", "sklearn"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    return info


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# -- 1 and 2: SK versus the k-NN vote; search FLOP rate ---------------------------------------------------
def bench_ratio(cfg: dict, mm_cfg: dict, thread_counts: list[int]) -> dict:
    """SK, the k-NN vote and their parts, once per thread count (the machine's, and one thread)."""
    g = torch.Generator().manual_seed(0)
    m, n, d, k = cfg["M"], cfg["N"], cfg["d"], cfg["k"]
    x = torch.randn(n, d, generator=g)
    z = torch.randn(m, d, generator=g)
    y = F.one_hot(torch.randint(0, cfg["classes"], (n,), generator=g), cfg["classes"]).float()
    ls = sk.auto_lengthscale(x, k=k)
    _, idx = sk.knn_search(z, x, k)

    def vote():  # the plain chunked k-NN vote: same search, then the mean of the neighbours' one-hots
        _, nn_idx = sk.knn_search(z, x, k)
        return y[nn_idx].mean(1)

    fns = {
        "knn_vote": vote,
        "sk": lambda: sk.sparse_krr(z, x, y, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3),
        "search": lambda: sk.knn_search(z, x, k),
        "sk_local_only": lambda: sk.sparse_krr(z, x, y, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3,
                                               indices=idx),
        "sk_local_float64": lambda: sk.sparse_krr(z, x, y, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3,
                                                  indices=idx, solve_dtype=torch.float64),
    }
    a = torch.randn(mm_cfg["n"], mm_cfg["n"])
    chunk = sk.knn.default_chunk_size(m, n)
    zc = torch.randn(chunk, d)
    blocks = -(-m // chunk)
    runs = {}
    before = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            med, raw = interleaved_medians(fns, cfg["repeats"])
            # Matmul rates: a square sgemm (the machine's rate) and the search's (chunk, d) x (d, N) shape.
            square, _ = interleaved_medians({"mm": lambda: a @ a}, mm_cfg["repeats"])
            shaped, _ = interleaved_medians({"mm": lambda: [zc @ x.t() for _ in range(blocks)]}, mm_cfg["repeats"])
            runs[threads] = {
                "median_s": med, "all_s": raw, "ratio": med["sk"] / med["knn_vote"],
                "search_gflops": 2 * m * n * d / med["search"] / 1e9,
                "square_mm_gflops": 2 * mm_cfg["n"] ** 3 / square["mm"] / 1e9,
                "search_shape_mm_gflops": 2 * blocks * chunk * n * d / shaped["mm"] / 1e9,
            }
            log(f"{threads} thread(s): SK / k-NN vote = {runs[threads]['ratio']:.3f}")
    finally:
        torch.set_num_threads(before)
    return {"config": cfg, "lengthscale": ls, "runs": runs, "chunk": chunk, "mm_n": mm_cfg["n"],
            "threads": thread_counts[0]}


# -- 3: scaling against exact KRR and scikit-learn --------------------------------------------------------
def target_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * torch.pi * x[:, 0]) + torch.cos(2 * torch.pi * x[:, 1]) + 2 * x[:, 2] * x[:, 3]


def bench_scaling(cfg: dict) -> dict:
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
        row["sk_rel_err"] = float((f_sk - fz).norm() / fz.norm())
        row["exact_rel_err"] = float((f_ex - fz).norm() / fz.norm())
        row["sk_vs_exact"] = float((f_sk - f_ex).norm() / f_ex.norm())
        if n <= cfg["sklearn_max_n"]:
            def fit_predict():
                model = KernelRidge(alpha=lam, kernel="rbf", gamma=1.0 / (2 * ls ** 2)).fit(x.numpy(), y.numpy())
                return torch.from_numpy(model.predict(z.numpy()))
            row["sklearn_s"], f_skl = timed(fit_predict)
            row["sklearn_rel_err"] = float((f_skl.float() - fz).norm() / fz.norm())
            log(f"scaling N={n}: scikit-learn {row['sklearn_s']:.2f}s")
        rows.append(row)
    slopes = {}
    for key in ("sk_s", "exact_s", "sklearn_s"):
        pts = [(r["N"], r[key]) for r in rows if key in r]
        if len(pts) >= 2:
            slopes[key] = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])
    return {"config": cfg, "rows": rows, "slopes": slopes}


# -- 4: peak memory in a fresh subprocess -----------------------------------------------------------------
def memory_case(M: int, N: int, d: int, k: int, classes: int, threads: int) -> dict:  # noqa: N803
    """Run inside the subprocess: inputs, baseline RSS, SK, peak RSS (VmHWM)."""
    m, n = M, N
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g)
    z = torch.randn(m, d, generator=g)
    y = F.one_hot(torch.randint(0, classes, (n,), generator=g), classes).float()
    ls = sk.auto_lengthscale(x, k=k)
    base = proc_status_kib("VmRSS")
    hwm_before = proc_status_kib("VmHWM")
    try:  # reset the peak to the current RSS (Linux >= 4.0), so VmHWM measures from here
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    t, f = timed(lambda: sk.sparse_krr(z, x, y, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3))
    assert torch.isfinite(f).all()
    return {"baseline_rss_kib": base, "hwm_kib": proc_status_kib("VmHWM"), "hwm_before_kib": hwm_before,
            "peak_reset": reset, "seconds": t, "output_shape": list(f.shape)}


def bench_memory(cfg: dict, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case",
           json.dumps({**cfg, "threads": threads})]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory case failed:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["increase_gib"] = (out["hwm_kib"] - out["baseline_rss_kib"]) / 2 ** 20
    out["dense_gib"] = cfg["M"] * cfg["N"] * 4 / 2 ** 30
    out["config"] = cfg
    return out


# -- 5: Fashion-MNIST -----------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion():
    files = {s: (FASHION_DIR / f"{s}-images-idx3-ubyte.gz", FASHION_DIR / f"{s}-labels-idx1-ubyte.gz")
             for s in ("train", "t10k")}
    if not all(p.exists() for pair in files.values() for p in pair):
        return None
    out = []
    for split in ("train", "t10k"):
        images, labels = (read_idx(p) for p in files[split])
        out.append(torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0))
        out.append(torch.from_numpy(labels.astype(np.int64)))
    return out


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(1) == labels).float().mean())


def bench_fashion(cfg: dict) -> dict:
    data = load_fashion()
    if data is None:
        return {"skipped": f"Fashion-MNIST files not found in {FASHION_DIR}"}
    x_train, y_train, x_test, y_test = data
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x_train), generator=g)
    if cfg["n_support"]:
        perm = perm[: cfg["n_support"] + cfg["n_val"]]
    if cfg["n_test"]:
        x_test, y_test = x_test[: cfg["n_test"]], y_test[: cfg["n_test"]]
    val_idx, sup_idx = perm[: cfg["n_val"]], perm[cfg["n_val"]:]
    x_sup, y_sup, x_val, y_val = x_train[sup_idx], y_train[sup_idx], x_train[val_idx], y_train[val_idx]
    x_all, y_all = x_train[perm], y_train[perm]
    onehot = lambda lab: F.one_hot(lab, 10).float()  # noqa: E731
    res = {"config": cfg, "n_support_select": len(x_sup), "n_val": len(x_val), "n_support_test": len(x_all),
           "n_test": len(x_test)}

    # SK: one search on the validation split, reused for the whole grid through indices=.
    kmax = max(cfg["ks"])
    t_search, (_, idx_val) = timed(lambda: sk.knn_search(x_val, x_sup, kmax))
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
    res.update(grid=grid, best=best, grid_s=time.perf_counter() - t0, autos=autos)

    # Test: support = all training points (validation included), the chosen setting.
    ls_test = best["mult"] * sk.auto_lengthscale(x_all, k=best["k"])
    t_sk, f = timed(lambda: sk.sparse_krr(x_test, x_all, onehot(y_all), k=best["k"], kernel=best["kernel"],
                                           lengthscale=ls_test, ridge=best["ridge"]))
    res["sk_test_acc"], res["sk_test_s"], res["sk_test_lengthscale"] = accuracy(f, y_test), t_sk, ls_test
    log(f"fashion: SK test acc {res['sk_test_acc']:.4f} ({t_sk:.1f}s)")
    t_knn, scores = timed(lambda: sk.weighted_knn(x_test, x_all, y_all, 10, k=20, temperature=0.07))
    res["knn_test_acc"], res["knn_test_s"] = accuracy(scores, y_test), t_knn
    log(f"fashion: DINO weighted k-NN test acc {res['knn_test_acc']:.4f} ({t_knn:.1f}s)")

    # Exact KRR (Gaussian): lengthscale and ridge picked on a small subset, then fit on a larger one;
    # SK with its own chosen setting on that same subset for a like-for-like comparison.
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
    res.update(exact_grid=egrid, exact_best=ebest, exact_n=n_ex, exact_test_acc=accuracy(f, y_test),
               exact_test_s=t_ex, exact_lengthscale=ls_ex)
    log(f"fashion: exact KRR on {n_ex}: test acc {res['exact_test_acc']:.4f} ({t_ex:.1f}s)")
    ls_sub = best["mult"] * sk.auto_lengthscale(x_ex, k=best["k"])
    t_sub, f = timed(lambda: sk.sparse_krr(x_test, x_ex, onehot(y_ex), k=best["k"], kernel=best["kernel"],
                                            lengthscale=ls_sub, ridge=best["ridge"]))
    res["sk_subset_test_acc"], res["sk_subset_test_s"] = accuracy(f, y_test), t_sub
    t_knn_sub, scores = timed(lambda: sk.weighted_knn(x_test, x_ex, y_ex, 10, k=20, temperature=0.07))
    res["knn_subset_test_acc"], res["knn_subset_test_s"] = accuracy(scores, y_test), t_knn_sub
    log(f"fashion: on the {n_ex} subset: SK {res['sk_subset_test_acc']:.4f}, k-NN {res['knn_subset_test_acc']:.4f}")
    return res


# -- report ---------------------------------------------------------------------------------------------
def fmt_s(sec: float) -> str:
    return f"{sec:.4f}" if sec < 0.1 else f"{sec:.3f}" if sec < 10 else f"{sec:.1f}"


def report(command: str, info: dict, load: tuple, results: dict, quick: bool, total_s: float) -> str:
    out = ["# sk benchmark", ""]
    if quick:
        out += ["**Quick smoke run (tiny sizes): not the benchmark's numbers.**", ""]
    out += [
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}, "
        f"CUDA available: {info['cuda']}  ",
        f"Software: Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, "
        f"scikit-learn {info['sklearn']}, faiss {info['faiss']}, {info['platform']}  ",
        f"Load average (1, 5, 15 min) at start: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; at end: "
        f"{load[3]:.2f}, {load[4]:.2f}, {load[5]:.2f} (the machine is shared: other jobs can slow any number)  ",
        f"Total benchmark time: {total_s / 60:.1f} min. All runs on the CPU, float32 unless said otherwise.",
        "",
    ]
    r = results["ratio"]
    c = r["config"]
    counts = list(r["runs"])
    out += [
        "## 1. SK versus a plain k-NN vote (same data, same torch brute-force search)",
        "",
        f"M={c['M']} evaluation points, N={c['N']} support points, d={c['d']}, k={c['k']}, {c['classes']} "
        f"one-hot targets, Gaussian kernel, lengthscale auto ({r['lengthscale']:.3g}), ridge 1e-3. "
        f"Median of {c['repeats']} interleaved repeats after one warm-up, at {r['threads']} torch threads (the "
        "machine's cores) and again at 1 thread: on a shared machine a busy core stalls every parallel "
        "operation, which the one-thread run does not see.",
        "",
        "| what | " + " | ".join(f"median s, {t} thread(s) | all repeats (s)" for t in counts) + " |",
        "|---|" + "---|---|" * len(counts),
    ]
    labels = {"knn_vote": "k-NN vote (search + mean of neighbour targets)", "sk": "SK (search + local solves)",
              "search": "search alone", "sk_local_only": "SK local solves alone (indices given)",
              "sk_local_float64": "SK local solves alone, solve_dtype=float64"}
    for key, label in labels.items():
        cells = [f"{fmt_s(r['runs'][t]['median_s'][key])} | {', '.join(fmt_s(v) for v in r['runs'][t]['all_s'][key])}"
                 for t in counts]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "**SK / k-NN vote time ratio: " + ", ".join(f"{r['runs'][t]['ratio']:.3f} at {t} thread(s)"
                                                         for t in counts) + "** (target <= 1.3, stretch <= 1.15).", ""]
    out += [
        "## 2. Search FLOP rate",
        "",
        "| threads | square sgemm " + f"{r['mm_n']}^3 GFLOP/s (the machine's matmul rate) | sgemm in the search's block "
        f"shape ({r['chunk']} x {c['d']}) x ({c['d']} x {c['N']}) GFLOP/s | neighbour search 2MNd / time GFLOP/s "
        "(matmul + top-k + ties) | search / square sgemm |",
        "|---|---|---|---|---|",
    ]
    for t in counts:
        q = r["runs"][t]
        out.append(f"| {t} | {q['square_mm_gflops']:.1f} | {q['search_shape_mm_gflops']:.1f} | {q['search_gflops']:.1f} | "
                   f"**{q['search_gflops'] / q['square_mm_gflops']:.2f}** |")
    out.append("")
    s = results["scaling"]
    c = s["config"]
    out += [
        "## 3. SK versus exact KRR and scikit-learn",
        "",
        f"Synthetic regression: x ~ U[0,1]^{c['d']}, y = sin(2 pi x1) + cos(2 pi x2) + 2 x3 x4 + 0.1 noise; "
        f"M={c['M']} test points; Gaussian kernel, lengthscale {c['lengthscale']}, ridge {c['ridge']}; SK with "
        f"k={c['k']}. Error: ||f - f*|| / ||f*|| against the noiseless target on the test points. SK time is the "
        f"median of {c['repeats']} (search included, repeats alternating over N); exact KRR (torch Cholesky, float32) and scikit-learn "
        f"KernelRidge (kernel='rbf', gamma=1/(2 l^2), float32 input) are single runs (fit + predict).",
        "",
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
    names = {"sk_s": "SK", "exact_s": "exact KRR", "sklearn_s": "scikit-learn"}
    out += ["", "Fitted scaling exponents (slope of log time on log N): "
            + ", ".join(f"{names[k]} {v:.2f}" for k, v in s["slopes"].items()) + ".", ""]
    last = s["rows"][-1]
    out += [f"**At N={last['N']} SK is {last['exact_s'] / last['sk_s']:.1f}x faster than exact KRR** (target >= 20x).",
            ""]
    mres = results["memory"]
    c = mres["config"]
    out += [
        "## 4. Peak memory",
        "",
        f"M={c['M']}, N={c['N']}, d={c['d']}, k={c['k']}, {c['classes']} one-hot targets, float32, in a fresh "
        f"subprocess: peak RSS (VmHWM{' reset after the inputs were made' if mres['peak_reset'] else ''}) minus "
        f"the RSS with the inputs made.",
        "",
        "| baseline RSS | peak RSS | increase | time | a dense M x N float32 matrix would need |",
        "|---|---|---|---|---|",
        f"| {mres['baseline_rss_kib'] / 2 ** 20:.2f} GiB | {mres['hwm_kib'] / 2 ** 20:.2f} GiB | "
        f"**{mres['increase_gib']:.2f} GiB** | {fmt_s(mres['seconds'])} s | {mres['dense_gib']:.1f} GiB |",
        "",
        "Target: increase <= 3 GiB.",
        "",
    ]
    fm = results["fashion"]
    out += ["## 5. Fashion-MNIST, raw pixels in [0, 1] (training-free)", ""]
    if "skipped" in fm:
        out += [fm["skipped"], ""]
    else:
        b = fm["best"]
        out += [
            f"Selection: {fm['n_val']} validation points held out of the training set (seeded), support = the "
            f"other {fm['n_support_select']}; grid kernel x k x lengthscale multiplier (of "
            "sk.auto_lengthscale(support, k)) x ridge, one search reused through indices=. Test: support = all "
            f"{fm['n_support_test']} training points, {fm['n_test']} test points.",
            "",
            f"Chosen SK setting: kernel {b['kernel']}, k={b['k']}, lengthscale {b['mult']} x auto = "
            f"{fm['sk_test_lengthscale']:.3g}, ridge {b['ridge']:g} (validation accuracy {b['val_acc']:.4f}). "
            f"Exact KRR: Gaussian, lengthscale {fm['exact_best']['mult']} x auto = {fm['exact_lengthscale']:.3g}, "
            f"ridge {fm['exact_best']['ridge']:g}, picked on a {fm['config']['exact_select_n']}-point subset "
            f"(validation accuracy {fm['exact_best']['val_acc']:.4f}).",
            "",
            "| method | support | test accuracy | time s |",
            "|---|---|---|---|",
            f"| SK ({b['kernel']}, k={b['k']}) | {fm['n_support_test']} | **{fm['sk_test_acc']:.4f}** | "
            f"{fmt_s(fm['sk_test_s'])} |",
            f"| DINO weighted k-NN (k=20, T=0.07) | {fm['n_support_test']} | {fm['knn_test_acc']:.4f} | "
            f"{fmt_s(fm['knn_test_s'])} |",
            f"| exact KRR (Gaussian) | {fm['exact_n']} | {fm['exact_test_acc']:.4f} | {fmt_s(fm['exact_test_s'])} |",
            f"| SK, same setting | {fm['exact_n']} | {fm['sk_subset_test_acc']:.4f} | "
            f"{fmt_s(fm['sk_subset_test_s'])} |",
            f"| DINO weighted k-NN | {fm['exact_n']} | {fm['knn_subset_test_acc']:.4f} | "
            f"{fmt_s(fm['knn_subset_test_s'])} |",
            "",
            "<details><summary>Validation grid</summary>",
            "",
            "| kernel | k | lengthscale mult | ridge | val acc |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {g['kernel']} | {g['k']} | {g['mult']} | {g['ridge']:g} | {g['val_acc']:.4f} |" for g in fm["grid"]]
        out += ["", "| exact KRR lengthscale mult | ridge | val acc |", "|---|---|---|"]
        out += [f"| {g['mult']} | {g['ridge']:g} | {g['val_acc']:.4f} |" for g in fm["exact_grid"]]
        out += ["", "</details>", ""]
    return "\n".join(out)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench_sk.md", help="Markdown report to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the script")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        print(json.dumps(memory_case(**json.loads(args.memory_case))))
        return
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    command = shlex.join([os.path.relpath(sys.executable) if not sys.executable.startswith("/usr") else "python",
                          os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])
    info = machine_info()
    load0 = os.getloadavg()
    start = time.perf_counter()
    log(f"machine: {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}")
    results = {}
    log("1-2. SK versus the k-NN vote, search FLOP rate")
    results["ratio"] = bench_ratio(cfg["ratio"], cfg["matmul"], sorted({args.threads, 1}, reverse=True))
    log("3. scaling against exact KRR and scikit-learn")
    results["scaling"] = bench_scaling(cfg["scaling"])
    log("4. peak memory (subprocess)")
    results["memory"] = bench_memory(cfg["memory"], args.threads)
    log(f"peak increase {results['memory']['increase_gib']:.2f} GiB in {results['memory']['seconds']:.1f}s")
    log("5. Fashion-MNIST")
    results["fashion"] = bench_fashion(cfg["fashion"])
    total = time.perf_counter() - start
    text = report(command, info, load0 + os.getloadavg(), results, args.quick, total)
    write_atomic(Path(args.out), text)
    log(f"wrote {args.out} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
