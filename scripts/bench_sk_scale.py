#!/usr/bin/env python
"""Scale benchmark of sk (issue 19) on this machine; writes a Markdown report (results/bench_sk_scale.md).

    .venv/bin/python scripts/bench_sk_scale.py --out results/bench_sk_scale.md     # N = 10M (see the estimate)
    .venv/bin/python scripts/bench_sk_scale.py --quick --out /tmp/scale.md         # seconds: a smoke run
    .venv/bin/python scripts/bench_sk_scale.py --n 1000000 --out /tmp/scale_1m.md  # any size by flags

Data: a labelled synthetic bank with structure. N points of d dimensions in ``--clusters`` clusters; a point
is its cluster's centre plus a ``--latent``-dimensional Gaussian in the cluster's own random subspace plus
isotropic noise; its label is the cluster's class (clusters are spread over ``--classes`` classes), replaced
by a uniformly drawn class with probability ``--label-noise``. Queries are drawn the same way. Rows are drawn
in blocks of 65,536, each from its own seed, so any process draws any row range (the sharded section's
processes draw their shards alone). SK: labels (``num_classes``), k = ``--k``, Gaussian kernel, lengthscale
= the median distance from a query to its k-th exact neighbour (one rule for every method), ridge ``--ridge``.

Sections (all in this process except 4 and 5, which run in fresh processes):
1. Exact SK: ``sk.knn_search`` (search budget ``--search-mib``) and ``sk.sparse_krr`` on the whole bank: time
   and accuracy; the baseline of the ratios. The default search budget is timed on the first
   ``--default-queries`` queries.
2. IVF (``sk.SearchIndex(x, "ivf")``, built once): build time; per ``--nprobe``: search time, recall@k against
   the exact search, SK accuracy and its difference from exact SK, speed-ups against section 1.
3. HNSW (``sk.SearchIndex(x, "hnsw")``) on the first ``--hnsw-n`` rows (building a graph of 10M points takes
   longer than the whole benchmark on 2 cores): the same columns against the exact search of those rows.
4. The bank in a .npy file (``sk.FileSupport``): exact search in a fresh process, its peak resident memory
   (VmHWM, reset after the queries are loaded) beyond the process with its queries, equality with section 1.
5. Sharded: 2 gloo processes (``sk.ShardedSupport``), each drawing and holding half the bank and half the
   queries, with half the threads each: time of the call and max |difference| from section 1's SK scores.

Targets (issue 19): IVF >= 10x faster than exact at >= 99% recall@k with SK accuracy within 0.1 point of exact;
the file search's peak <= 2 GiB beyond the queries whatever N; sharded = single process to 1e-6.

Every number in the report is measured by this script; the report is written atomically at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sk  # noqa: E402
from experiments.core.atomic import atomic_write  # noqa: E402
from scripts.bench.memory import proc_status_kib  # noqa: E402
from scripts.bench.provenance import Provenance, command_line  # noqa: E402
from scripts.bench.timing import fmt_s, heading, log, timed  # noqa: E402

GIB = 2 ** 30
BLOCK_ROWS = 1 << 16
APPROX_REPEATS = 3      # approximate searches are cheap: the median of 3 (the exact search runs once)
FULL = dict(n=10_000_000, queries=1000, hnsw_n=1_000_000, default_queries=100)
QUICK = dict(n=60_000, queries=300, hnsw_n=20_000, default_queries=50)


@dataclass
class Synthetic:
    """The labelled bank and its queries (module doc): ``rows(start, stop, stream)`` draws any row range."""

    d: int = 64
    clusters: int = 1000
    classes: int = 100
    latent: int = 8
    noise: float = 0.05
    label_noise: float = 0.1
    seed: int = 0
    tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not 1 <= self.latent <= self.d:
            raise ValueError(f"latent must be in [1, d={self.d}], got {self.latent}")
        g = torch.Generator().manual_seed(self.seed)
        self.tables = dict(centres=2.0 * torch.randn(self.clusters, self.d, generator=g),
                           basis=torch.linalg.qr(torch.randn(self.clusters, self.d, self.latent, generator=g)).Q,
                           class_of=torch.randint(0, self.classes, (self.clusters,), generator=g))

    def block(self, b: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS) of stream 0 (the bank) or 1 (the queries)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + stream) * 1_000_003 + b)
        t = self.tables
        c = torch.randint(0, self.clusters, (BLOCK_ROWS,), generator=g)
        u = torch.randn(BLOCK_ROWS, self.latent, 1, generator=g)
        x = t["centres"][c] + torch.bmm(t["basis"][c], u).squeeze(2) + self.noise * torch.randn(
            BLOCK_ROWS, self.d, generator=g)
        flip = torch.rand(BLOCK_ROWS, generator=g) < self.label_noise
        labels = torch.where(flip, torch.randint(0, self.classes, (BLOCK_ROWS,), generator=g), t["class_of"][c])
        return x, labels

    def rows(self, start: int, stop: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = torch.empty(stop - start, self.d), torch.empty(stop - start, dtype=torch.long)
        for b in range(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS)):
            bx, bl = self.block(b, stream)
            lo, hi = max(start, b * BLOCK_ROWS), min(stop, (b + 1) * BLOCK_ROWS)
            x[lo - start:hi - start] = bx[lo - b * BLOCK_ROWS:hi - b * BLOCK_ROWS]
            labels[lo - start:hi - start] = bl[lo - b * BLOCK_ROWS:hi - b * BLOCK_ROWS]
        return x, labels


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((scores.argmax(1) == labels).float().mean())


def exact_search(x, z, cfg) -> dict:
    """The exact search of the whole support (``sk.knn_search``, search budget ``--search-mib``)."""
    with sk.block_budget(search_bytes=cfg["search_mib"] << 20):
        seconds, (d2, idx) = timed(lambda: sk.knn_search(z, x, cfg["k"]))
    return dict(search_s=seconds, d2=d2, idx=idx)


def add_solve(res: dict, x, labels, z, zl, cfg) -> dict:
    """SK's local solves on the neighbours ``res["idx"]`` (the part every search shares): their time, the SK
    time (search + solves), the scores and their accuracy."""
    seconds, scores = timed(lambda: sk.sparse_krr(z, x, labels, k=cfg["k"], num_classes=cfg["classes"],
                                                  indices=res["idx"], lengthscale=cfg["lengthscale"],
                                                  ridge=cfg["ridge"]))
    res.update(solve_s=seconds, sk_s=res["search_s"] + seconds, scores=scores, accuracy=accuracy(scores, zl))
    return res


# -- section 1 -------------------------------------------------------------------------------------------
def exact_section(x, labels, z, zl, cfg) -> dict:
    """Sets ``cfg["lengthscale"]``: the median distance from a query to its k-th exact neighbour."""
    q = min(cfg["default_queries"], len(z))
    t_default, _ = timed(lambda: sk.knn_search(z[:q], x, cfg["k"]))
    res = exact_search(x, z, cfg)
    cfg["lengthscale"] = float(res["d2"][:, cfg["k"] - 1].clamp_min(0).sqrt().median())
    add_solve(res, x, labels, z, zl, cfg)
    res["default_per_query_s"] = t_default / q
    log(f"exact: search {res['search_s']:.1f}s, solves {res['solve_s']:.1f}s, accuracy {res['accuracy']:.2f}")
    return res


# -- sections 2 and 3 ------------------------------------------------------------------------------------
def approximate_rows(index, settings, name, x, labels, z, zl, cfg) -> list[dict]:
    """Per probe setting: search time (the median of ``APPROX_REPEATS`` searches, after one warm-up search),
    SK time (search + solves), accuracy; recall is added by the caller."""
    index.search(z[:8], cfg["k"])
    rows = []
    for value in settings:
        runs = [timed(lambda v=value: index.search(z, cfg["k"], **{name: v})) for _ in range(APPROX_REPEATS)]
        seconds, (_, idx) = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        rows.append(add_solve(dict(setting=value, search_s=seconds, idx=idx), x, labels, z, zl, cfg))
        log(f"{index.kind} {name}={value}: search {seconds:.2f}s")
    return rows


def with_recall(rows: list[dict], exact: dict) -> list[dict]:
    for row in rows:
        row["recall"] = sk.recall_at_k(row.pop("idx"), exact["idx"])
        row.pop("scores")
    return rows


def ivf_section(x, labels, z, zl, exact, cfg) -> dict:
    nlist = max(1, round(math.sqrt(len(x))))
    index = sk.SearchIndex(x, "ivf", nlist=nlist, train_size=min(len(x), 64 * nlist))
    log(f"IVF built in {index.build_seconds:.1f}s (nlist {nlist})")
    rows = approximate_rows(index, cfg["nprobe"], "nprobe", x, labels, z, zl, cfg)
    return dict(build_s=index.build_seconds, nlist=nlist, rows=with_recall(rows, exact))


def hnsw_section(x, labels, z, zl, exact, cfg) -> dict:
    n = min(cfg["hnsw_n"], len(x))
    xs, ls = x[:n], labels[:n]
    # The exact answer on the same rows is this section's baseline.
    sub = add_solve(exact_search(xs, z, cfg), xs, ls, z, zl, cfg) if n < len(x) else exact
    index = sk.SearchIndex(xs, "hnsw", hnsw_m=cfg["hnsw_m"], ef_construction=cfg["ef_construction"])
    log(f"HNSW built in {index.build_seconds:.1f}s on {n} rows")
    rows = approximate_rows(index, cfg["ef"], "ef_search", xs, ls, z, zl, cfg)
    return dict(build_s=index.build_seconds, n=n, exact=sub, rows=with_recall(rows, sub))


# -- section 4 -------------------------------------------------------------------------------------------
def reset_peak() -> bool:
    """Restart the process's peak resident memory (VmHWM) from its present RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def file_probe(path: str, queries: str, out: str, k: int, threads: int) -> None:
    """Run in a fresh process: load the queries, reset the peak, search the file, report the peak."""
    torch.set_num_threads(threads)
    z = torch.load(queries)
    support = sk.FileSupport(path)
    sk.knn_search(z[:8], torch.randn(4096, support.d), k)        # first-use allocations before the baseline
    reset = reset_peak()
    base = proc_status_kib("VmRSS")
    seconds, (d2, idx) = timed(lambda: support.search(z, k))
    torch.save(dict(d2=d2, idx=idx), out)
    print(json.dumps(dict(seconds=seconds, base_kib=base, hwm_kib=proc_status_kib("VmHWM"), reset=reset,
                          block_rows=support._block_rows(torch.device("cpu")))))


def file_section(x, z, exact, cfg, tmp: Path) -> dict:
    path, queries, out = tmp / "bank.npy", tmp / "queries.pt", tmp / "file_search.pt"
    t_write, _ = timed(lambda: np.save(path, x.numpy()))
    torch.save(z, queries)
    cmd = [sys.executable, __file__, "--file-probe", str(path), str(queries), str(out), str(cfg["k"]),
           str(cfg["threads"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"file probe failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    got = torch.load(out)
    path.unlink()
    res.update(write_s=t_write, file_gib=len(x) * x.shape[1] * 4 / GIB,
               peak_gib=(res["hwm_kib"] - res["base_kib"]) / 2 ** 20,
               same_rows=int((got["idx"] == exact["idx"]).all(1).sum()),
               same_sets=int((got["idx"].sort(1).values == exact["idx"].sort(1).values).all(1).sum()),
               max_d2_diff=float((got["d2"] - exact["d2"]).abs().max()))
    log(f"file search {res['seconds']:.1f}s, peak +{res['peak_gib']:.3f} GiB")
    return res


# -- section 5 -------------------------------------------------------------------------------------------
def shard_worker(rank: int, port: int, data: dict, cfg: dict, tmp: str) -> None:
    """One of the 2 processes: draw its half of the bank and of the queries, run the sharded SK call."""
    torch.set_num_threads(max(1, cfg["threads"] // 2))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        gen = Synthetic(**data)
        n, m = cfg["n"], cfg["queries"]
        x, labels = gen.rows(rank * n // 2, (rank + 1) * n // 2)
        z, _ = gen.rows(rank * m // 2, (rank + 1) * m // 2, stream=1)
        support = sk.ShardedSupport(x, labels, num_classes=cfg["classes"])
        reset_peak()
        base = proc_status_kib("VmRSS")
        with sk.block_budget(search_bytes=cfg["search_mib"] << 20):
            dist.barrier()
            seconds, scores = timed(lambda: support.sparse_krr(z, k=cfg["k"], lengthscale=cfg["lengthscale"],
                                                                ridge=cfg["ridge"]))
            dist.barrier()
        torch.save(dict(scores=scores, seconds=seconds, base_kib=base, hwm_kib=proc_status_kib("VmHWM"),
                        shard_gib=x.numel() * 4 / GIB), Path(tmp) / f"shard{rank}.pt")
    finally:
        dist.destroy_process_group()


def sharded_section(gen: Synthetic, exact, cfg, tmp: Path) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = {k: v for k, v in asdict(gen).items() if k != "tables"}
    t_all, _ = timed(lambda: mp.start_processes(shard_worker, args=(port, data, cfg, str(tmp)), nprocs=2,
                                                start_method="spawn"))
    parts = [torch.load(tmp / f"shard{r}.pt") for r in range(2)]
    scores = torch.cat([p["scores"] for p in parts])
    res = dict(seconds=max(p["seconds"] for p in parts), processes_s=t_all,
               max_diff=float((scores - exact["scores"]).abs().max()),
               same_predictions=int((scores.argmax(1) == exact["scores"].argmax(1)).sum()),
               hwm_gib=[p["hwm_kib"] / 2 ** 20 for p in parts], shard_gib=[p["shard_gib"] for p in parts],
               call_gib=[(p["hwm_kib"] - p["base_kib"]) / 2 ** 20 for p in parts])
    log(f"sharded {res['seconds']:.1f}s, max diff {res['max_diff']:.3g}")
    return res


# -- the report ------------------------------------------------------------------------------------------
def best_ivf(ivf: dict) -> dict | None:
    """The fastest IVF setting with recall@k >= 99%, or None."""
    good = [r for r in ivf["rows"] if r["recall"] >= 0.99]
    return min(good, key=lambda r: r["sk_s"]) if good else None


def target_lines(exact: dict, res: dict) -> list[str]:
    out = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    if "ivf" in res:
        row = best_ivf(res["ivf"])
        if row is None:
            out.append("| IVF >= 10x faster than exact at >= 99% recall@k, SK accuracy within 0.1 point | no "
                       "setting reached 99% recall | no |")
        else:
            speed, gap = exact["sk_s"] / row["sk_s"], row["accuracy"] - exact["accuracy"]
            out.append(f"| IVF >= 10x faster than exact at >= 99% recall@k, SK accuracy within 0.1 point | nprobe "
                       f"{row['setting']}: recall {100 * row['recall']:.2f}%, SK {speed:.1f}x faster (search "
                       f"{exact['search_s'] / row['search_s']:.1f}x), accuracy {gap:+.2f} points | "
                       f"{'yes' if speed >= 10 and abs(gap) <= 0.1 else 'no'} |")
    if "file" in res:
        f = res["file"]
        out.append(f"| file search: peak resident <= 2 GiB beyond the queries | {f['peak_gib']:.3f} GiB for a "
                   f"{f['file_gib']:.2f} GiB bank | {'yes' if f['peak_gib'] <= 2 else 'no'} |")
    if "sharded" in res:
        s = res["sharded"]
        out.append(f"| 2-process sharded SK = single process to 1e-6 | max difference {s['max_diff']:.3g} | "
                   f"{'yes' if s['max_diff'] <= 1e-6 else 'no'} |")
    return out + [""]


def one_row_table(title: str, intro: str, cells: dict[str, str]) -> list[str]:
    """A section of one table row: its heading, its paragraph, the column names and the values."""
    return heading(title, intro) + ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells),
                                    "| " + " | ".join(cells.values()) + " |", ""]


def exact_lines(exact: dict, cfg: dict) -> list[str]:
    return one_row_table(
        "1. Exact SK (the baseline of every ratio)",
        f"`sk.knn_search` with a {cfg['search_mib']} MiB search budget (`sk.block_budget`), then `sk.sparse_krr` "
        f"with `indices=` (the local solves). With the default budget (64 MiB on the CPU) the search takes "
        f"{fmt_s(exact['default_per_query_s'])} s a query (first {cfg['default_queries']} queries) against "
        f"{fmt_s(exact['search_s'] / cfg['queries'])} s here.",
        {"search (s)": fmt_s(exact["search_s"]), "solves (s)": fmt_s(exact["solve_s"]),
         "SK = search + solves (s)": fmt_s(exact["sk_s"]), "accuracy (%)": f"{exact['accuracy']:.2f}"})


def approx_lines(title: str, setting: str, sec: dict, base: dict, intro: str) -> list[str]:
    out = heading(title, intro) + [
        f"| {setting} | search (s) | search speed-up | SK (s) | SK speed-up | recall@k (%) | accuracy (%) | "
        "accuracy - exact (points) |", "|---|---|---|---|---|---|---|---|"]
    for r in sec["rows"]:
        out.append(f"| {r['setting']} | {fmt_s(r['search_s'])} | {base['search_s'] / r['search_s']:.1f}x | "
                   f"{fmt_s(r['sk_s'])} | {base['sk_s'] / r['sk_s']:.1f}x | {100 * r['recall']:.2f} | "
                   f"{r['accuracy']:.2f} | {r['accuracy'] - base['accuracy']:+.2f} |")
    return out + [""]


def file_lines(f: dict, cfg: dict) -> list[str]:
    m = cfg["queries"]
    return one_row_table(
        "4. The bank in a file (`sk.FileSupport`), exact search",
        f"The bank written to a float32 .npy file ({f['file_gib']:.2f} GiB, in {fmt_s(f['write_s'])} s; read from the "
        f"page cache where it fits) and searched in a fresh process, {f['block_rows']} rows a block (the default "
        f"search budget). Peak: VmHWM {'reset' if f['reset'] else 'NOT reset (includes start-up)'} after the "
        f"queries were loaded, minus the RSS then.",
        {"search (s)": fmt_s(f["seconds"]), "vs in-memory search": f"{f['seconds'] / f['exact_search_s']:.2f}x",
         "peak beyond the queries (GiB)": f"**{f['peak_gib']:.3f}**",
         "rows identical to section 1": f"{f['same_rows']} of {m}", "same neighbour sets": f"{f['same_sets']} of {m}",
         "max distance difference": f"{f['max_d2_diff']:.3g}"})


def sharded_lines(s: dict, exact: dict, cfg: dict) -> list[str]:
    return one_row_table(
        "5. Sharded SK, 2 gloo processes",
        f"Each process draws its half of the bank ({s['shard_gib'][0]:.2f} GiB) and of the queries and runs with "
        f"{max(1, cfg['threads'] // 2)} thread(s); `ShardedSupport(...).sparse_krr` timed between barriers. Single "
        f"process: section 1 (search + solves, {cfg['threads']} threads). Of which the call: the peak during the "
        "call minus the RSS before it (the exact search's score block, within the search budget, and the exchange).",
        {"sharded call (s)": fmt_s(s["seconds"]), "single process (s)": fmt_s(exact["sk_s"]),
         "ratio": f"{s['seconds'] / exact['sk_s']:.2f}x",
         "max abs difference of the scores": f"**{s['max_diff']:.3g}**",
         "same predictions": f"{s['same_predictions']} of {cfg['queries']}",
         "peak RSS per process (GiB)": ", ".join(f"{g:.2f}" for g in s["hwm_gib"]),
         "of which the call (GiB)": ", ".join(f"{g:.3f}" for g in s["call_gib"])})


def report(prov: Provenance, quick: bool, cfg: dict, gen: Synthetic, exact: dict, res: dict) -> str:
    scope = (f"Bank: N={cfg['n']:,} x d={gen.d} float32 in {gen.clusters} clusters ({gen.latent}-dim. spread, noise "
             f"{gen.noise}), {gen.classes} classes, label noise {gen.label_noise}; {cfg['queries']} queries drawn "
             f"alike (drawn in {fmt_s(cfg['draw_s'])} s). SK: labels, k={cfg['k']}, Gaussian, lengthscale "
             f"{cfg['lengthscale']:.4g} (median distance to the k-th exact neighbour), ridge {cfg['ridge']}.")
    out = prov.header("sk at scale: approximate index, file bank, sharded support", quick, prov.machine_line(),
                      scope)
    out += target_lines(exact, res) + exact_lines(exact, cfg)
    if "ivf" in res:
        v = res["ivf"]
        out += approx_lines("2. IVF (`sk.SearchIndex(x, \"ivf\")`)", "nprobe", v, exact,
                            f"nlist = {v['nlist']} cells (sqrt N), trained on {min(cfg['n'], 64 * v['nlist']):,} rows "
                            f"and filled once in {fmt_s(v['build_s'])} s. Ratios against section 1.")
    if "hnsw" in res:
        h = res["hnsw"]
        out += approx_lines("3. HNSW (`sk.SearchIndex(x, \"hnsw\")`)", "ef_search", h, h["exact"],
                            f"On the first {h['n']:,} rows (M={cfg['hnsw_m']}, ef_construction="
                            f"{cfg['ef_construction']}), built once in {fmt_s(h['build_s'])} s. Baseline: the exact "
                            f"search of the same rows, {fmt_s(h['exact']['search_s'])} s + solves "
                            f"{fmt_s(h['exact']['solve_s'])} s, accuracy {h['exact']['accuracy']:.2f}%.")
    if "file" in res:
        out += file_lines(res["file"], cfg)
    if "sharded" in res:
        out += sharded_lines(res["sharded"], exact, cfg)
    return "\n".join(out)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench_sk_scale.md", help="Markdown report to write")
    p.add_argument("--quick", action="store_true", help=f"small sizes, a smoke run ({QUICK})")
    for name, kind, default, text in (
            ("n", int, None, f"bank rows (default {FULL['n']:,})"), ("queries", int, None, "queries"),
            ("hnsw-n", int, None, "rows of the HNSW section"), ("default-queries", int, None,
                                                                 "queries timed with the default budget"),
            ("d", int, 64, "dimensions"), ("clusters", int, 1000, "clusters"), ("classes", int, 100, "classes"),
            ("latent", int, 8, "dimensions of a cluster's spread"), ("noise", float, 0.05, "isotropic noise"),
            ("label-noise", float, 0.1, "probability of a random label"), ("k", int, 32, "neighbours"),
            ("ridge", float, 0.1, "SK's ridge"), ("hnsw-m", int, 32, "HNSW links a node"),
            ("ef-construction", int, 80, "HNSW build candidates"), ("search-mib", int, 1024,
                                                                      "search budget of the exact search (MiB)"),
            ("threads", int, os.cpu_count() or 1, "torch threads"), ("seed", int, 0, "data seed")):
        p.add_argument(f"--{name}", type=kind, default=default, help=text)
    p.add_argument("--nprobe", type=int_list, default=[1, 2, 4, 8, 16], help="IVF cells probed (comma list)")
    p.add_argument("--ef", type=int_list, default=[32, 64, 128, 256], help="HNSW ef_search values (comma list)")
    p.add_argument("--sections", type=int_list, default=[2, 3, 4, 5], help="sections besides 1 (comma list)")
    p.add_argument("--tmp-dir", default=None, help="where the bank file of section 4 is written (and removed)")
    p.add_argument("--file-probe", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.file_probe:
        path, queries, out, k, threads = args.file_probe
        return file_probe(path, queries, out, int(k), int(threads))
    torch.set_num_threads(args.threads)
    prov = Provenance(command_line(__file__, argv), args.threads)
    log(f"machine: {prov.machine_line()}; commit {prov.commit}")
    gen = Synthetic(args.d, args.clusters, args.classes, args.latent, args.noise, args.label_noise, args.seed)
    cfg = {key: getattr(args, key) for key in ("n", "queries", "hnsw_n", "default_queries", "k", "ridge", "nprobe",
                                               "ef", "hnsw_m", "ef_construction", "search_mib", "threads")}
    cfg["classes"] = args.classes
    cfg["draw_s"], (x, labels) = timed(lambda: gen.rows(0, args.n))
    z, zl = gen.rows(0, args.queries, stream=1)
    log(f"drew {args.n:,} x {args.d} in {cfg['draw_s']:.1f}s")
    exact, res = exact_section(x, labels, z, zl, cfg), {}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        if 2 in args.sections:
            res["ivf"] = ivf_section(x, labels, z, zl, exact, cfg)
        if 3 in args.sections:
            res["hnsw"] = hnsw_section(x, labels, z, zl, exact, cfg)
        if 4 in args.sections:
            res["file"] = dict(file_section(x, z, exact, cfg, Path(tmp)), exact_search_s=exact["search_s"])
        if 5 in args.sections:
            res["sharded"] = sharded_section(gen, exact, cfg, Path(tmp))
    text = report(prov, args.quick, cfg, gen, exact, res)
    with atomic_write(Path(args.out)) as tmp_path:
        tmp_path.write_text(text)
    log(f"wrote {args.out} in {(time.perf_counter() - prov.started) / 60:.1f} min")


if __name__ == "__main__":
    main()
