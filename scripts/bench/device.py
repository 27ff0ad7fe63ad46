"""The GPU section (results/bench_sk_cuda.md): SK against the k-NN vote written as DINO's evaluation
writes it (a large score block filled by a matmul, topk, a weighted vote) at three shapes up to the
ImageNet k-NN evaluation shape, SK's peak memory there, C=10 against C=1000, and a training step.
On the CPU (``--device-section-on-cpu``) the same code runs at tiny sizes: a check of the code path."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sk

from .classes import measure_train_step, train_lines
from .provenance import Provenance
from .timing import device_timer, fmt_s, interleaved_medians, log


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


def measure_shape(cfg: dict, shape: tuple, target: float, device: torch.device) -> dict:
    """SK against DINO's vote at one shape (M, N, d, k, C): times, ratio, SK's parts and peak memory;
    at the last shape also C=10 against this C."""
    timer = device_timer(device)
    m, n, d, k, c = shape
    gen = torch.Generator(device=device).manual_seed(5)
    x = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    z = F.normalize(torch.randn(m, d, device=device, generator=gen), dim=1)
    labels = torch.randint(0, c, (n,), device=device, generator=gen)
    x_t = x.t().contiguous()               # DINO keeps the bank transposed, made once
    block_rows = max(1, min(m, cfg["vote_block_bytes"] // (4 * n)))
    block = torch.empty(block_rows, n, device=device)
    ls = sk.auto_lengthscale(x, k=k)
    _, idx = sk.knn_search(z, x, k)

    def run_sk(lab=labels, cc=c, **kw):
        return sk.sparse_krr(z, x, lab, k=k, lengthscale=ls, ridge=1e-3, num_classes=cc, **kw)

    fns = {"vote": lambda: dino_vote(z, x_t, labels, k, c, block), "sk": run_sk,
           "search": lambda: sk.knn_search(z, x, k), "local": lambda: run_sk(indices=idx)}
    med, raw = interleaved_medians(fns, cfg["repeats"], timer)
    del block           # SK's peak without the vote's block held: SK's CUDA budget reads the free memory
    row = {"shape": shape, "median_s": med, "all_s": raw, "ratio": med["sk"] / med["vote"], "target": target,
           "vote_block_rows": block_rows, "sk_peak_bytes": peak_bytes(device, run_sk)}
    vote_block = torch.empty(block_rows, n, device=device)
    row["vote_peak_bytes"] = peak_bytes(device, lambda: dino_vote(z, x_t, labels, k, c, vote_block))
    del vote_block, x_t
    if shape == tuple(cfg["shapes"][-1]):
        cls = {cc: (lambda lab=labels % cc, cc=cc: run_sk(lab, cc)) for cc in sorted({10, c})}
        cmed, craw = interleaved_medians(cls, cfg["repeats"], timer)
        row["classes"] = {"median_s": cmed, "all_s": craw}
    log(f"device {device}: shape {shape}: SK / vote = {row['ratio']:.3f}")
    return row


def measure(cfg: dict, device: torch.device) -> dict:
    rows = []
    for shape, target in zip(cfg["shapes"], cfg["targets"]):
        rows.append(measure_shape(cfg, tuple(shape), target, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"config": cfg, "rows": rows, "train": measure_train_step(cfg["train"], device)}


def card(device: torch.device, info: dict) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"Device: {torch.cuda.get_device_name(device)}, {props.total_memory / 2 ** 30:.0f} GiB, "
                f"CUDA {torch.version.cuda}")
    return f"Device: CPU ({info['cpu']}): a check of the code path at tiny sizes, not GPU numbers"


def report(prov: Provenance, device: torch.device, res: dict, quick: bool) -> str:
    out = prov.header("sk benchmark on a GPU", quick, card(device, prov.machine),
                      "float32, features L2-normalised, random.")
    out += [
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
    out += ["", f"Peak memory target at the last shape: <= {res['config']['memory_target_gib']} GiB beyond the "
            "support features and labels.", ""]
    last = res["rows"][-1]
    if "classes" in last:
        cm = last["classes"]["median_s"]
        cs = sorted(cm)
        out += ["## Number of classes", "", f"SK with integer labels at the last shape, C = {cs[0]} and C = {cs[-1]} "
                "(same features, labels taken modulo C).", "", "| C | SK s |", "|---|---|"]
        out += [f"| {cc} | {fmt_s(cm[cc])} |" for cc in cs]
        out += ["", f"**C={cs[-1]} / C={cs[0]}: {cm[cs[-1]] / cm[cs[0]]:.3f}** (target <= 1.2).", ""]
    return "\n".join(out + train_lines(res["train"]))
