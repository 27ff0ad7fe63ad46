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
5. Classes and training: SK with integer labels at C=10 and C=1000 on the same data (the label path),
   and one training step (forward + backward to the evaluation points, fixed support 50k x 256, batch
   1024, k=32) against the neighbour search alone.
6. Fashion-MNIST raw pixels: training-free SK (k, lengthscale, ridge, kernel picked on a validation
   split) against DINO's weighted k-NN and exact KRR on a subset.
7. Small calls, one thread (an RL agent's SK head: 256 support points, d=256, k=16): the time of one
   call with 1 and 64 queries, and of forward + backward to 64 queries, on a plain tensor and on an
   ``sk.PrecomputedSupport`` (with and without its N x N distances).

When CUDA is present, a GPU section is measured too and written to ``--cuda-out``
(results/bench_sk_cuda.md) with the card's name: SK against the k-NN vote written as DINO's evaluation
writes it (a large score block filled by a matmul, topk, a weighted vote) at three shapes up to the
ImageNet k-NN evaluation shape, SK's peak memory there, C=10 against C=1000, and a training step.
``--cuda-only`` runs that section alone. ``--device-section-on-cpu`` runs the same code on the CPU at
tiny sizes (a check of the code path, not GPU numbers; used by the tests).

Every number in the report is measured by this script; the reports are written atomically at the end.
Ratios compare runs made in the same process, interleaved.
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
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sk  # noqa: E402
from experiments.core.atomic import atomic_write  # noqa: E402

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
    classes=dict(M=4000, N=20000, d=256, k=32, Cs=[10, 1000], repeats=5),
    train=dict(N=50000, d=256, batch=1024, k=32, classes=10, repeats=5),
    small=dict(N=256, d=256, k=16, c=2, batch=64, calls=200, repeats=7),
)
QUICK = dict(
    ratio=dict(M=200, N=1000, d=32, k=8, classes=5, repeats=2),
    matmul=dict(n=256, repeats=2),
    scaling=dict(Ns=[250, 500, 1000], M=200, d=4, k=16, lengthscale=0.5, ridge=1e-2, repeats=1,
                 sklearn_max_n=1000),
    memory=dict(M=2000, N=5000, d=16, k=8, classes=5),
    fashion=dict(n_val=300, n_support=2000, n_test=300, ks=[8, 16], mults=[1.0], ridges=[1e-1],
                 kernels=["gaussian"], exact_select_n=500, exact_n=1000, exact_mults=[1.0], exact_ridges=[1e-1]),
    classes=dict(M=200, N=1000, d=32, k=8, Cs=[10, 1000], repeats=2),
    train=dict(N=2000, d=32, batch=128, k=8, classes=10, repeats=2),
    small=dict(N=256, d=256, k=16, c=2, batch=64, calls=10, repeats=2),
)
# The GPU section: (M queries, N support, d, k, C), the last the ImageNet k-NN evaluation shape (DINO: k=20).
DEVICE_FULL = dict(
    shapes=[(4000, 20000, 256, 32, 10), (50000, 200000, 256, 32, 10), (10000, 1281167, 384, 20, 1000)],
    repeats=7, vote_block_bytes=2 << 30, targets=[1.7, 1.15, 1.15], memory_target_gib=1.0,
    train=dict(N=50000, d=256, batch=1024, k=32, classes=10, repeats=7),
)
DEVICE_QUICK = dict(
    shapes=[(64, 500, 16, 8, 10), (200, 3000, 16, 8, 10), (100, 4000, 24, 6, 100)],
    repeats=2, vote_block_bytes=1 << 20, targets=[1.7, 1.15, 1.15], memory_target_gib=1.0,
    train=dict(N=2000, d=32, batch=128, k=8, classes=10, repeats=2),
)


def log(msg: str) -> None:
    print(f"[bench_sk {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def device_timer(device: torch.device):
    """``timed`` that waits for the device's queued work before and after (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return timed

    def run(fn):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, out
    return run


def interleaved_medians(fns: dict, repeats: int, timer=timed) -> dict:
    """Median seconds of each function; one warm-up each, then the functions alternate per repeat so
    that slow drifts of a shared machine hit them alike."""
    for fn in fns.values():
        timer(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn)[0])
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

    labels = y.argmax(1)
    fns = {
        "knn_vote": vote,
        "sk": lambda: sk.sparse_krr(z, x, y, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3),
        "sk_labels": lambda: sk.sparse_krr(z, x, labels, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3,
                                           num_classes=cfg["classes"]),
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


# -- 5: classes and a training step ------------------------------------------------------------------------
def bench_classes(cfg: dict, device: torch.device = torch.device("cpu")) -> dict:
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
    cmax = max(cfg["Cs"])
    onehot = F.one_hot(base % cmax, cmax).float()
    fns[f"onehot_{cmax}"] = lambda: sk.sparse_krr(z, x, onehot, k=k, lengthscale=ls, ridge=1e-3)
    med, raw = interleaved_medians(fns, cfg["repeats"], device_timer(device))
    cmin = min(cfg["Cs"])
    out = {"config": cfg, "median_s": med, "all_s": raw,
           "ratio": med[f"labels_{cmax}"] / med[f"labels_{cmin}"],
           "onehot_ratio": med[f"onehot_{cmax}"] / med[f"labels_{cmax}"]}
    log(f"classes: C={cmax} / C={cmin} = {out['ratio']:.3f}; one-hot / labels at C={cmax} = {out['onehot_ratio']:.2f}")
    return out


def bench_train_step(cfg: dict, device: torch.device = torch.device("cpu")) -> dict:
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


# -- the device section (CUDA; on the CPU only as a check of the code path) -------------------------------
def dino_vote(z: torch.Tensor, x_t: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int,
              block: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """The weighted k-NN vote as DINO's evaluation writes it (eval_knn.py, knn_classifier): the
    similarities of a chunk of queries with the transposed bank fill a large block (one matmul), topk,
    the neighbours' labels one-hot encoded and weighted by exp(s / T), summed per class."""
    out = torch.empty(z.shape[0], num_classes, dtype=z.dtype, device=z.device)
    rows = block.shape[0]
    for s in range(0, z.shape[0], rows):
        zc = z[s:s + rows]
        b = zc.shape[0]
        similarity = torch.mm(zc, x_t, out=block[:b])
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        retrieved = torch.gather(labels.view(1, -1).expand(b, -1), 1, indices)
        one_hot = torch.zeros(b * k, num_classes, device=z.device).scatter_(1, retrieved.view(-1, 1), 1)
        weights = distances.div(temperature).exp()
        out[s:s + b] = (one_hot.view(b, -1, num_classes) * weights.view(b, -1, 1)).sum(1)
    return out


def peak_bytes(device: torch.device, fn) -> int | None:
    """Peak device memory allocated by ``fn`` beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def bench_device(cfg: dict, device: torch.device) -> dict:
    """SK against DINO's vote at each shape on ``device``: times, ratio, SK's parts and peak memory."""
    timer = device_timer(device)
    rows = []
    for (m, n, d, k, c), target in zip(cfg["shapes"], cfg["targets"]):
        gen = torch.Generator(device=device).manual_seed(5)
        x = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
        z = F.normalize(torch.randn(m, d, device=device, generator=gen), dim=1)
        labels = torch.randint(0, c, (n,), device=device, generator=gen)
        x_t = x.t().contiguous()               # DINO keeps the bank transposed, made once
        block = torch.empty(max(1, min(m, cfg["vote_block_bytes"] // (4 * n))), n, device=device)
        ls = sk.auto_lengthscale(x, k=k)
        _, idx = sk.knn_search(z, x, k)

        def run_sk():
            return sk.sparse_krr(z, x, labels, k=k, lengthscale=ls, ridge=1e-3, num_classes=c)

        fns = {"vote": lambda: dino_vote(z, x_t, labels, k, c, block), "sk": run_sk,
               "search": lambda: sk.knn_search(z, x, k),
               "local": lambda: sk.sparse_krr(z, x, labels, k=k, lengthscale=ls, ridge=1e-3, num_classes=c,
                                              indices=idx)}
        med, raw = interleaved_medians(fns, cfg["repeats"], timer)
        del block
        row = {"shape": (m, n, d, k, c), "median_s": med, "all_s": raw, "ratio": med["sk"] / med["vote"],
               "target": target, "vote_block_rows": max(1, min(m, cfg["vote_block_bytes"] // (4 * n))),
               "sk_peak_bytes": peak_bytes(device, run_sk)}
        vote_block = torch.empty(row["vote_block_rows"], n, device=device)
        row["vote_peak_bytes"] = peak_bytes(device, lambda: dino_vote(z, x_t, labels, k, c, vote_block))
        del vote_block, x_t
        if (m, n, d, k, c) == tuple(cfg["shapes"][-1]):
            cls = {}
            for cc in sorted({10, c}):
                lab = labels % cc
                cls[cc] = (lambda lab=lab, cc=cc: sk.sparse_krr(z, x, lab, k=k, lengthscale=ls, ridge=1e-3,
                                                               num_classes=cc))
            cmed, craw = interleaved_medians(cls, cfg["repeats"], timer)
            row["classes"] = {"median_s": cmed, "all_s": craw}
        rows.append(row)
        log(f"device {device}: shape {row['shape']}: SK / vote = {row['ratio']:.3f}")
        del x, z, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()
    train = bench_train_step(cfg["train"], device)
    return {"config": cfg, "rows": rows, "train": train}


def device_report(command: str, info: dict, device: torch.device, res: dict, quick: bool, total_s: float) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        card = f"{name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        card = f"CPU ({info['cpu']}): a check of the code path at tiny sizes, not GPU numbers"
    out = ["# sk benchmark on a GPU", ""]
    if quick:
        out += ["**Quick smoke run (tiny sizes): not the benchmark's numbers.**", ""]
    out += [
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
        f"Device: {card}  ",
        f"Software: Python {info['python']}, torch {info['torch']}  ",
        f"Total section time: {total_s / 60:.1f} min. float32, features L2-normalised, random.",
        "",
        "## SK versus the k-NN vote as DINO writes it",
        "",
        "The vote: the similarities of a chunk of queries with the transposed bank fill a score block of "
        f"{res['config']['vote_block_bytes'] / 2 ** 30:.3g} GiB (one matmul), then topk, then the neighbours' "
        "labels one-hot encoded, weighted by exp(s / 0.07) and summed per class. SK: `sk.sparse_krr` with "
        "integer labels (Gaussian kernel, auto lengthscale, ridge 1e-3), search included. Median of "
        f"{res['config']['repeats']} interleaved repeats after one warm-up; peak memory is what the call "
        "allocated beyond the inputs (support features, labels, queries).",
        "",
        "| M | N | d | k | C | vote s | SK s | SK / vote | target | search s | local solves s | "
        "SK peak GiB | vote peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def gib(b):
        return "n/a" if b is None else f"{b / 2 ** 30:.3f}"

    for row in res["rows"]:
        m, n, d, k, c = row["shape"]
        med = row["median_s"]
        out.append(f"| {m} | {n} | {d} | {k} | {c} | {fmt_s(med['vote'])} | {fmt_s(med['sk'])} | "
                   f"**{row['ratio']:.3f}** | <= {row['target']} | {fmt_s(med['search'])} | {fmt_s(med['local'])} | "
                   f"{gib(row['sk_peak_bytes'])} | {gib(row['vote_peak_bytes'])} |")
    last = res["rows"][-1]
    out += ["", f"Peak memory target at the last shape: <= {res['config']['memory_target_gib']} GiB beyond the "
            "support features and labels.", ""]
    if "classes" in last:
        cm = last["classes"]["median_s"]
        cs = sorted(cm)
        out += ["## Number of classes", "", f"SK with integer labels at the last shape, C = {cs[0]} and C = {cs[-1]} "
                "(same features, labels taken modulo C).", "", "| C | SK s |", "|---|---|"]
        out += [f"| {cc} | {fmt_s(cm[cc])} |" for cc in cs]
        out += ["", f"**C={cs[-1]} / C={cs[0]}: {cm[cs[-1]] / cm[cs[0]]:.3f}** (target <= 1.2).", ""]
    out += train_report(res["train"])
    return "\n".join(out)


def train_report(t: dict, heading: str = "##") -> list[str]:
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


# -- 6: Fashion-MNIST -----------------------------------------------------------------------------------
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


# -- 7: small calls -------------------------------------------------------------------------------------
def bench_small(cfg: dict) -> dict:
    """Microseconds per call of SK on a small fixed support, one thread, fresh queries every call (a pool
    cycled through: repeating one query would let the CPU's branch predictor learn the search's
    selection), median of interleaved repeats."""
    g = torch.Generator().manual_seed(7)
    n, d, k, c, b = cfg["N"], cfg["d"], cfg["k"], cfg["c"], cfg["batch"]
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = torch.randn(n, c, generator=g)
    ls = sk.auto_lengthscale(x, k=k)
    pool = {m: [F.normalize(torch.randn(m, d, generator=g), dim=1) for _ in range(32)] for m in (1, b)}
    supports = {"plain tensor": x, "PrecomputedSupport": sk.PrecomputedSupport(x),
                "PrecomputedSupport(distances=True)": sk.PrecomputedSupport(x, distances=True)}
    calls = cfg["calls"]

    def cases(xs):
        def nograd(m):
            def run():
                with torch.no_grad():
                    for j in range(calls):
                        sk.sparse_krr(pool[m][j % 32], xs, y, k=k, lengthscale=ls, ridge=1e-3)
            return run

        def grad():
            for j in range(calls):
                z = pool[b][j % 32].clone().requires_grad_()
                sk.sparse_krr(z, xs, y, k=k, lengthscale=ls, ridge=1e-3).sum().backward()
        return {"m1": nograd(1), f"m{b}": nograd(b), f"m{b}_grad": grad}

    fns = {(name, case): fn for name, xs in supports.items() for case, fn in cases(xs).items()}
    fns.update({("build", "plain"): lambda: [sk.PrecomputedSupport(x) for _ in range(calls)],
                ("build", "distances"): lambda: [sk.PrecomputedSupport(x, distances=True) for _ in range(calls)]})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        med, _ = interleaved_medians(fns, cfg["repeats"])
    finally:
        torch.set_num_threads(before)
    us = {key: 1e6 * v / calls for key, v in med.items()}
    log("small calls: " + ", ".join(f"{a} {b_}: {v:.0f} us" for (a, b_), v in us.items()))
    return {"config": cfg, "us": us, "lengthscale": ls, "paths": list(supports)}


def small_report(sm: dict) -> list[str]:
    c, us, b = sm["config"], sm["us"], sm["config"]["batch"]
    out = [
        "## 7. Small calls (one thread)",
        "",
        f"An RL agent's SK head: N={c['N']} unit-norm support points, d={c['d']}, k={c['k']}, {c['c']} targets, "
        f"Gaussian kernel (lengthscale auto, {sm['lengthscale']:.3g}), ridge 1e-3. Microseconds per call, median "
        f"of {c['repeats']} interleaved repeats of {c['calls']} calls, each on fresh queries. `sk.sparse_krr(z, x, "
        "y)` with x a plain tensor, or an `sk.PrecomputedSupport` of it prepared once (its preparation is timed "
        "separately).",
        "",
        f"| support | 1 query, no grad (us) | {b} queries, no grad (us) | {b} queries, forward + backward to them (us) |",
        "|---|---|---|---|",
    ]
    out += [f"| {name} | {us[(name, 'm1')]:.0f} | {us[(name, f'm{b}')]:.0f} | {us[(name, f'm{b}_grad')]:.0f} |"
            for name in sm["paths"]]
    out += ["", f"Preparing the support: {us[('build', 'plain')]:.0f} us; with its N x N distances "
            f"{us[('build', 'distances')]:.0f} us.", ""]
    return out


# -- report ---------------------------------------------------------------------------------------------
def fmt_s(sec: float) -> str:
    """Seconds to 4 significant digits, so that ratios of printed times match the printed ratios."""
    return f"{sec:.4g}" if sec < 1000 else f"{sec:.0f}"


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
              "sk_labels": "SK with integer labels (label path, no one-hot targets)", "search": "search alone", "sk_local_only": "SK local solves alone (indices given)",
              "sk_local_float64": "SK local solves alone, solve_dtype=float64"}
    for key, label in labels.items():
        cells = [f"{fmt_s(r['runs'][t]['median_s'][key])} | {', '.join(fmt_s(v) for v in r['runs'][t]['all_s'][key])}"
                 for t in counts]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "**SK / k-NN vote time ratio: " + ", ".join(f"{r['runs'][t]['ratio']:.3f} at {t} thread(s)"
                                                         for t in counts) + "** (target <= 1.15).", ""]
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
        f"| {mres['baseline_rss_kib'] / 2 ** 20:.3f} GiB | {mres['hwm_kib'] / 2 ** 20:.3f} GiB | "
        f"**{mres['increase_gib']:.3f} GiB** | {fmt_s(mres['seconds'])} s | {mres['dense_gib']:.3g} GiB |",
        "",
        "Target: increase <= 3 GiB.",
        "",
    ]
    cl = results["classes"]
    c = cl["config"]
    cs = sorted(c["Cs"])
    out += [
        "## 5. Number of classes, and a training step",
        "",
        f"SK with integer labels (`sk.sparse_krr(z, x, labels, num_classes=C)`: one solve per point and a "
        f"scatter-add by label, no one-hot targets) on the same data at each C: M={c['M']}, N={c['N']}, d={c['d']}, "
        f"k={c['k']}, labels modulo C; and the one-hot path at C={cs[-1]} for comparison. Median of "
        f"{c['repeats']} interleaved repeats.",
        "",
        "| path | C | SK s |",
        "|---|---|---|",
    ]
    out += [f"| integer labels | {cc} | {fmt_s(cl['median_s'][f'labels_{cc}'])} |" for cc in cs]
    out += [f"| one-hot targets | {cs[-1]} | {fmt_s(cl['median_s'][f'onehot_{cs[-1]}'])} |", "",
            f"**C={cs[-1]} / C={cs[0]}: {cl['ratio']:.3f}** (target <= 1.2); one-hot / labels at C={cs[-1]}: "
            f"{cl['onehot_ratio']:.2f}.", ""]
    out += train_report(results["train"], "###")
    fm = results["fashion"]
    out += ["## 6. Fashion-MNIST, raw pixels in [0, 1] (training-free)", ""]
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
    out += small_report(results["small"])
    return "\n".join(out)


def write_report(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench_sk.md", help="Markdown report to write")
    parser.add_argument("--cuda-out", help="GPU report (default: the --out name with _cuda before .md)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the script")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--cuda-only", action="store_true", help="only the GPU section")
    parser.add_argument("--device-section-on-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        print(json.dumps(memory_case(**json.loads(args.memory_case))))
        return
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    command = shlex.join([os.path.relpath(sys.executable) if not sys.executable.startswith("/usr") else "python",
                          os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])
    out_path = Path(args.out)
    cuda_out = Path(args.cuda_out) if args.cuda_out else out_path.with_name(out_path.stem + "_cuda.md")
    info = machine_info()
    if not args.cuda_only:
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
        log("5. classes and a training step")
        results["classes"] = bench_classes(cfg["classes"])
        results["train"] = bench_train_step(cfg["train"])
        log("6. Fashion-MNIST")
        results["fashion"] = bench_fashion(cfg["fashion"])
        log("7. small calls")
        results["small"] = bench_small(cfg["small"])
        total = time.perf_counter() - start
        text = report(command, info, load0 + os.getloadavg(), results, args.quick, total)
        write_report(out_path, text)
        log(f"wrote {out_path} in {total / 60:.1f} min")
    if torch.cuda.is_available() or args.device_section_on_cpu:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.device_section_on_cpu else "cpu")
        dcfg = DEVICE_QUICK if args.quick or device.type == "cpu" else DEVICE_FULL
        start = time.perf_counter()
        log(f"GPU section on {device}")
        res = bench_device(dcfg, device)
        total = time.perf_counter() - start
        write_report(cuda_out, device_report(command, info, device, res, args.quick, total))
        log(f"wrote {cuda_out} in {total / 60:.1f} min")
    elif args.cuda_only:
        raise SystemExit("--cuda-only: no CUDA device here")


if __name__ == "__main__":
    main()
