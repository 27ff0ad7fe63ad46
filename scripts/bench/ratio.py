"""Sections 1 and 2: SK against a plain chunked k-NN vote with the same search, and the search's FLOP
rate against the machine's matmul rate (one measurement serves both)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sk
from sk.budget import search_rows

from .timing import fmt_s, heading, interleaved_medians, log, ratio_spread, verdict_text

TARGET = 1.15                 # SK / k-NN vote time ratio

LABELS = {"knn_vote": "k-NN vote (search + mean of neighbour targets)", "sk": "SK (search + local solves)",
          "sk_labels": "SK with integer labels (label path, no one-hot targets)", "search": "search alone",
          "sk_local_only": "SK local solves alone (indices given)",
          "sk_local_float64": "SK local solves alone, solve_dtype=float64"}


def section(sizes: dict, threads: int) -> list[str]:
    res = measure(sizes["ratio"], sizes["matmul"], sorted({threads, 1}, reverse=True))
    return vote_lines(res) + flops_lines(res)


def calls(cfg: dict) -> dict:
    """The timed calls of section 1 on its random data (M queries, N support points, one-hot targets)."""
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

    def run_sk(targets, **kw):
        return lambda: sk.sparse_krr(z, x, targets, k=k, kernel="gaussian", lengthscale=ls, ridge=1e-3, **kw)

    fns = {"knn_vote": vote, "sk": run_sk(y), "sk_labels": run_sk(y.argmax(1), num_classes=cfg["classes"]),
           "search": lambda: sk.knn_search(z, x, k), "sk_local_only": run_sk(y, indices=idx),
           "sk_local_float64": run_sk(y, indices=idx, solve_dtype=torch.float64)}
    return {"fns": fns, "x": x, "lengthscale": ls}


def measure(cfg: dict, mm_cfg: dict, thread_counts: list[int]) -> dict:
    """SK, the k-NN vote and their parts, once per thread count (the machine's, and one thread), with
    the matmul rates: a square sgemm (the machine's rate) and the search's (chunk, d) x (d, N) shape."""
    m, n, d = cfg["M"], cfg["N"], cfg["d"]
    case = calls(cfg)
    x = case["x"]
    a = torch.randn(mm_cfg["n"], mm_cfg["n"])
    chunk = search_rows(m, n, 4, torch.device("cpu"))        # the search's rows per block, float32
    zc = torch.randn(chunk, d)
    blocks = -(-m // chunk)
    runs = {}
    before = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            med, raw = interleaved_medians(case["fns"], cfg["repeats"])
            square, _ = interleaved_medians({"mm": lambda: a @ a}, mm_cfg["repeats"])
            shaped, _ = interleaved_medians({"mm": lambda: [zc @ x.t() for _ in range(blocks)]}, mm_cfg["repeats"])
            runs[threads] = {
                "median_s": med, "all_s": raw, "ratio": med["sk"] / med["knn_vote"],
                "spread": ratio_spread(raw["sk"], raw["knn_vote"]),
                "search_gflops": 2 * m * n * d / med["search"] / 1e9,
                "square_mm_gflops": 2 * mm_cfg["n"] ** 3 / square["mm"] / 1e9,
                "search_shape_mm_gflops": 2 * blocks * chunk * n * d / shaped["mm"] / 1e9,
            }
            log(f"{threads} thread(s): SK / k-NN vote = {runs[threads]['ratio']:.3f}")
    finally:
        torch.set_num_threads(before)
    return {"config": cfg, "lengthscale": case["lengthscale"], "runs": runs, "chunk": chunk, "mm_n": mm_cfg["n"],
            "threads": thread_counts[0]}


def vote_lines(r: dict) -> list[str]:
    c = r["config"]
    counts = list(r["runs"])
    out = heading(
        "1. SK versus a plain k-NN vote (same data, same torch brute-force search)",
        f"M={c['M']} evaluation points, N={c['N']} support points, d={c['d']}, k={c['k']}, {c['classes']} "
        f"one-hot targets, Gaussian kernel, lengthscale auto ({r['lengthscale']:.3g}), ridge 1e-3. "
        f"Median of {c['repeats']} interleaved repeats after one warm-up, at {r['threads']} torch threads (the "
        "machine's cores) and again at 1 thread: on a shared machine a busy core stalls every parallel "
        "operation, which the one-thread run does not see.") + [
        "| what | " + " | ".join(f"median s, {t} thread(s) | all repeats (s)" for t in counts) + " |",
        "|---|" + "---|---|" * len(counts),
    ]
    for key, label in LABELS.items():
        cells = [f"{fmt_s(r['runs'][t]['median_s'][key])} | {', '.join(fmt_s(v) for v in r['runs'][t]['all_s'][key])}"
                 for t in counts]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    runs = r["runs"]
    return out + ["", "**SK / k-NN vote time ratio: " + ", ".join(f"{runs[t]['ratio']:.3f} at {t} thread(s)"
                                                                for t in counts) + "**. Target "
                  + "; ".join(f"{verdict_text(runs[t]['ratio'], runs[t]['spread'], TARGET)} at {t} thread(s)"
                              for t in counts)
                  + " (the repeats' range is of the ratio within each interleaved repeat).", ""]


def flops_lines(r: dict) -> list[str]:
    c = r["config"]
    out = heading("2. Search FLOP rate") + [
        f"| threads | square sgemm {r['mm_n']}^3 GFLOP/s (the machine's matmul rate) | sgemm in the search's block "
        f"shape ({r['chunk']} x {c['d']}) x ({c['d']} x {c['N']}) GFLOP/s | neighbour search 2MNd / time GFLOP/s "
        "(matmul + top-k + ties) | search / square sgemm |",
        "|---|---|---|---|---|",
    ]
    for t, q in r["runs"].items():
        out.append(f"| {t} | {q['square_mm_gflops']:.1f} | {q['search_shape_mm_gflops']:.1f} | "
                   f"{q['search_gflops']:.1f} | **{q['search_gflops'] / q['square_mm_gflops']:.2f}** |")
    return out + [""]
