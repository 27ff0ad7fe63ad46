"""Neighbour search behind one interface, the DINO weighted k-NN readout, and the auto lengthscale.

``knn_search(z, x, k)`` returns the k nearest support points of every evaluation point in Euclidean
distance, ties broken by the lower index (the contract), sorted by distance. A tie is a tie of the
computed scores: points at equal distance in exact arithmetic whose rounded scores differ (a matmul may
round the same dot product differently in different columns) are ordered by their rounded scores; data
whose scores are exact (small integers, the corners of a cube) tie exactly. Backends:

- ``"torch"`` (default): exact chunked brute force on the tensors' device. Each chunk of evaluation
  points forms ||x||^2 - 2 z.x (one matmul; ||z||^2 does not change the ranking so it is added to the
  k winners only), then ``topk``. Memory is one (chunk, N) score block, sized from the device
  (``sk.budget``: 64 MiB on the CPU, up to 768 MiB on a GPU). Scores are float32 for half-precision
  inputs (a half-precision support is converted a block of rows at a time, never copied whole).
  Ties: ``topk`` does not say which of equal values it keeps, so each chunk asks for k + 1 sorted
  values and marks the rows where two of them are equal; after the loop (one host synchronisation per
  call, none per chunk) only those rows are redone, keeping and ordering the lower indices first.
- ``"faiss"``: exact ``IndexFlatL2`` on the CPU (float32), if faiss is installed.
- ``"faiss-ivf"``: approximate ``IndexIVFFlat`` (nlist ~ sqrt(N) cells, nprobe of them searched).

The search carries no gradient: the neighbour set is piecewise constant. Callers that need
differentiable distances gather the neighbours and recompute exact differences (``sk.sparse_krr``
does).
"""
from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from .budget import search_rows
from .precision import HALF, no_autocast

__all__ = ["knn_search", "weighted_knn", "auto_lengthscale", "default_chunk_size", "BACKENDS"]

BACKENDS = ("torch", "faiss", "faiss-ivf")


def as_k(k) -> int:
    """k as a Python int >= 1: any integral type (int, numpy integers, integer 0-dim tensors); bool,
    float and non-positive values raise ValueError."""
    if isinstance(k, Tensor) and (k.is_floating_point() or k.dtype == torch.bool):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return _positive_index(k, "k must be an integer >= 1")


def as_chunk_size(chunk_size, name: str = "chunk_size") -> int | None:
    """None or a positive integer (rows per chunk); anything else raises ValueError."""
    if chunk_size is None:
        return None
    return _positive_index(chunk_size, f"{name} must be a positive integer or None")


def _positive_index(value, message: str) -> int:
    """value as a Python int >= 1 (any integral type; bool and float refused), else ValueError(message)."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"{message}, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{message}, got {value!r}") from None
    if index < 1:
        raise ValueError(f"{message}, got {value!r}")
    return index


def search_dtype(z_dtype: torch.dtype, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the score blocks: the wider input dtype, float32 for half-precision inputs.

    float16 and bfloat16 scores would rank neighbours only to 3 and 2 decimal digits (ties everywhere
    at the boundary, each one a redo), and ||x||^2 overflows float16 for features of norm > 256."""
    dtype = z_dtype if z_dtype == x_dtype else torch.promote_types(z_dtype, x_dtype)
    return torch.float32 if dtype in HALF else dtype


def default_chunk_size(rows: int, cols: int, budget: int | None = None, device="cpu") -> int:
    """Rows per chunk so that a (chunk, cols) float32 block fits ``budget`` bytes (default: the search
    budget of ``device``, see ``sk.budget``); at least 1."""
    if budget is None:
        return search_rows(rows, cols, 4, torch.device(device))
    return max(1, min(rows, budget // (4 * max(cols, 1))))


def _sq_norms(t: Tensor, dtype: torch.dtype, block_elements: int = 1 << 18) -> Tensor:
    """||t_i||^2 in ``dtype``, a block of rows at a time: (t * t).sum(1) at once would hold a temporary
    the size of the support (and a float32 copy of a half-precision one); 1 MiB blocks are also faster."""
    rows = max(1, block_elements // max(t.shape[1], 1))
    if t.shape[0] <= rows and t.dtype == dtype:
        return (t * t).sum(1)
    out = torch.empty(t.shape[0], dtype=dtype, device=t.device)
    for s in range(0, t.shape[0], rows):
        block = t[s:s + rows].to(dtype)
        torch.sum(block * block, 1, out=out[s:s + rows])
    return out


def _order_by_distance_then_index(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by (value, index): ties go to the lower index."""
    by_index = torch.argsort(idx, dim=1)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_value = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, by_value), idx.gather(1, by_value)


def _k_smallest_lowest_index(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest entries of each row, ties at the k-th value broken by the lower column index.

    With v the k-th smallest value of a row, the answer is every entry below v (fewer than k) and the
    lowest-index entries equal to v. A key of -1 (below v), the column index (equal to v) or N (above)
    finds them with one more ``topk``: O(N) per row where a stable sort would be O(N log N).
    """
    n = scores.shape[1]
    kth = torch.topk(scores, k, dim=1, largest=False, sorted=True).values[:, k - 1:k]
    cols = torch.arange(n, device=scores.device).expand(scores.shape[0], n)
    key = cols.masked_fill(scores > kth, n).masked_fill_(scores < kth, -1)
    sel = torch.topk(key, k, dim=1, largest=False, sorted=False).indices
    return _order_by_distance_then_index(scores.gather(1, sel), sel)


def _scores(zc: Tensor, x: Tensor, x2: Tensor, out: Tensor, scratch: Tensor | None) -> Tensor:
    """||x_j||^2 - 2 z.x_j for a chunk of evaluation points into ``out`` (rows, N): one fused addmm, or,
    for a support stored in another dtype (half precision), one per block of support points converted
    into ``scratch``."""
    if scratch is None:
        return torch.addmm(x2.unsqueeze(0), zc, x.t(), beta=1.0, alpha=-2.0, out=out)
    nb = scratch.shape[0]
    for s in range(0, x.shape[0], nb):
        xb = scratch[:min(nb, x.shape[0] - s)].copy_(x[s:s + nb])
        torch.addmm(x2[s:s + nb].unsqueeze(0), zc, xb.t(), beta=1.0, alpha=-2.0, out=out[:, s:s + nb])
    return out


def _search_torch(z: Tensor, x: Tensor, k: int, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Exact chunked search; one host synchronisation per call (the check for boundary ties)."""
    m, n, d = z.shape[0], x.shape[0], x.shape[1]
    dtype = search_dtype(z.dtype, x.dtype)
    esize = torch.finfo(dtype).bits // 8
    rows = min(chunk_size or search_rows(m, n, esize, z.device), m)
    # 1 MiB blocks for the norms on the CPU (faster than one pass); on a GPU an eighth of the score block,
    # so that a large support takes tens of kernel launches, not thousands.
    x2 = _sq_norms(x, dtype, 1 << 18 if x.device.type == "cpu" else max(1 << 18, rows * n // 8))
    # One (rows, N) block for all chunks: a fresh block per chunk costs page faults (measured 20-30%
    # of the matmul) and, on the CPU, glibc's allocator was seen to keep GiBs of freed blocks.
    block = torch.empty(rows, n, dtype=dtype, device=z.device)
    scratch = None
    if x.dtype != dtype:
        nb = max(1, min(n, rows * n // (4 * d)))     # a quarter of the score block's elements
        scratch = torch.empty(nb, d, dtype=dtype, device=x.device)
    full = k >= n
    vals = torch.empty(m, min(k, n), dtype=dtype, device=z.device)
    idx = torch.empty(m, min(k, n), dtype=torch.long, device=z.device)
    tied = None if full else torch.empty(m, dtype=torch.bool, device=z.device)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        zc = z[start:stop].to(dtype)
        scores = _scores(zc, x, x2, block[:stop - start], scratch)
        if full:
            v, i = torch.sort(scores, dim=1, stable=True)
        else:
            # topk does not promise which of equal values it keeps, nor their order. Asking for k + 1
            # sorted values shows every tie that matters (equal neighbours among the k + 1, across the
            # boundary or inside); such rows, rare for real-valued data, are redone after the loop.
            v, i = torch.topk(scores, k + 1, dim=1, largest=False, sorted=True)
            torch.any(v[:, 1:] == v[:, :-1], dim=1, out=tied[start:stop])
            v, i = v[:, :k], i[:, :k]
        # ||z||^2 does not change the ranking: it is added to the winners only.
        torch.add(v, (zc * zc).sum(1, keepdim=True), out=vals[start:stop])
        idx[start:stop] = i
    if tied is not None and bool(tied.any()):      # the call's one synchronisation
        redo = tied.nonzero().squeeze(1)
        per = max(1, rows // 3)                    # the int64 keys take twice the scores' bytes
        for s in range(0, redo.shape[0], per):
            r = redo[s:s + per]
            zc = z[r].to(dtype)
            v, i = _k_smallest_lowest_index(_scores(zc, x, x2, block[:r.shape[0]], scratch), k)
            vals[r] = v + (zc * zc).sum(1, keepdim=True)
            idx[r] = i
    return vals.clamp_min_(0.0).to(z.dtype), idx


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backend='faiss'/'faiss-ivf' needs the faiss package (pip install faiss-cpu); "
            "or use backend='torch'"
        ) from err
    return faiss


def _search_faiss(z: Tensor, x: Tensor, k: int, ivf: bool, nlist: int | None, nprobe: int | None):
    faiss = _import_faiss()
    xs = x.detach().to("cpu", torch.float32).contiguous().numpy()
    zs = z.detach().to("cpu", torch.float32).contiguous().numpy()
    n, d = xs.shape
    if ivf:
        nlist = nlist or max(1, int(round(math.sqrt(n))))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        index.train(xs)
        index.add(xs)
        index.nprobe = min(nlist, nprobe or max(1, nlist // 8))
    else:
        index = faiss.IndexFlatL2(d)
        index.add(xs)
    kk = min(k + 1, n)  # one extra to detect ties at the boundary, as in the torch search
    dist, idx = index.search(zs, kk)
    dist = torch.from_numpy(dist)
    idx = torch.from_numpy(idx).long()
    if not ivf and kk > k:
        tied = dist[:, k] == dist[:, k - 1]
        dist, idx = dist[:, :k], idx[:, :k]
        if bool(tied.any()):
            # Redo tied rows with the exact torch search, which keeps the lower indices.
            rows = tied.nonzero().squeeze(1)
            td, ti = _search_torch(z.detach().cpu().float()[rows], x.detach().cpu().float(), k, None)
            dist, idx = dist.index_put((rows,), td), idx.index_put((rows,), ti)
    else:
        dist, idx = dist[:, :k], idx[:, :k]
    # IVF can return fewer than k hits (-1) when the probed cells are small: fill with exact search.
    missing = (idx < 0).any(1)
    if bool(missing.any()):
        rows = missing.nonzero().squeeze(1)
        td, ti = _search_torch(z.detach().cpu().float()[rows], x.detach().cpu().float(), k, None)
        dist, idx = dist.index_put((rows,), td), idx.index_put((rows,), ti)
    dist, idx = _order_by_distance_then_index(dist.clamp_min(0.0), idx)
    return dist.to(z.device, z.dtype), idx.to(z.device)


@torch.no_grad()
def knn_search(z: Tensor, x: Tensor, k: int, backend: str = "torch", chunk_size: int | None = None,
               nlist: int | None = None, nprobe: int | None = None) -> tuple[Tensor, Tensor]:
    """The k nearest support points of each evaluation point (Euclidean; no gradient).

    Args:
        z: (M, d) evaluation points.
        x: (N, d) support points (z and x may differ in floating dtype: they meet in the wider one,
            float32 for half precision).
        k: neighbours per point (any integer type); k >= N returns all N.
        backend: ``"torch"`` (exact, chunked, any device), ``"faiss"`` (exact flat index, CPU) or
            ``"faiss-ivf"`` (approximate inverted file, CPU).
        chunk_size: evaluation points per chunk of the torch search (default: a (chunk, N) score block
            within the device's search budget, see ``sk.budget``).
        nlist, nprobe: cells of the IVF index and cells searched per query (defaults sqrt(N), nlist/8).

    Returns:
        sq_dists (M, k') in z's dtype and indices (M, k') with k' = min(k, N), sorted by distance, ties
        by the lower index (exact for ``torch`` and ``faiss``). The distances come from the matmul
        expansion and are meant for ranking; recompute exact differences where precision or gradients
        matter.

    The torch search synchronises with the host once per call (whether any row has a tie across the
    k-th place), not once per chunk, and runs with autocast off (scores in float32 or wider).
    """
    k = as_k(k)
    chunk_size = as_chunk_size(chunk_size)
    if z.dim() != 2 or x.dim() != 2:
        raise ValueError(f"z and x must be 2-D (M, d) and (N, d), got shapes {tuple(z.shape)} and {tuple(x.shape)}")
    if z.shape[1] != x.shape[1]:
        raise ValueError(f"feature size mismatch: z has d={z.shape[1]}, x has d={x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("empty support set: x has no rows")
    k = min(k, x.shape[0])
    if z.shape[0] == 0:
        return z.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=z.device)
    if backend == "torch":
        with no_autocast(z.device):
            return _search_torch(z.detach(), x.detach(), k, chunk_size)
    if backend in ("faiss", "faiss-ivf"):
        return _search_faiss(z, x, k, ivf=backend == "faiss-ivf", nlist=nlist, nprobe=nprobe)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def weighted_knn(z: Tensor, x: Tensor, labels: Tensor, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk_size: int | None = None, backend: str = "torch") -> Tensor:
    r"""DINO's weighted k-NN vote (Caron et al., 2021): class scores (M, C).

    Features are L2-normalised; the k most cosine-similar support points vote for their label with
    weight exp(s / T):

    .. math:: \mathrm{score}_c(z) = \sum_{j \in \mathrm{kNN}(z)} \exp(s_j / T)\, [y_j = c],
              \quad s_j = \frac{z^\top x_j}{\lVert z \rVert \lVert x_j \rVert}

    Args:
        z: (M, d) evaluation points; x: (N, d) support points; labels: (N,) integers in [0, C).
        num_classes: C. k: voters (20 in DINO). temperature: T (0.07 in DINO).
    Returns:
        scores (M, C) in z's dtype, at least float32 (exp(1 / 0.07) overflows float16);
        ``scores.argmax(1)`` is the prediction.
    """
    with no_autocast(z.device):
        dtype = torch.promote_types(z.dtype, torch.float32)
        zn = torch.nn.functional.normalize(z.to(dtype), dim=1)
        xn = torch.nn.functional.normalize(x, dim=1)
        # On unit vectors ||z - x||^2 = 2 - 2 cos, so the Euclidean search ranks by cosine similarity.
        _, idx = knn_search(zn, xn, k, backend=backend, chunk_size=chunk_size)
        sims = (zn.unsqueeze(1) * xn[idx].to(dtype)).sum(-1)
        weights = torch.exp(sims / temperature)
        scores = torch.zeros(z.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        return scores.scatter_add(1, labels.to(z.device).long()[idx], weights)


@torch.no_grad()
def auto_lengthscale(x: Tensor, k: int = 32, max_points: int = 2048, seed: int = 0) -> float:
    """Data-driven lengthscale: the median distance from a support point to its k-th nearest neighbour.

    Rule: draw up to ``max_points`` support points (a fixed-seed subsample), find for each its k-th
    nearest *other* support point (k is capped at N - 1), and return the median of these distances.
    Points whose k-th neighbour is a duplicate (distance 0) are left out of the median. Returns 1.0 when
    no positive distance exists (N < 2 or all points equal).

    Why this rule: a local system of k neighbours then spans about one lengthscale, so its kernel matrix
    is neither the identity (l too small: SK degenerates to the prior) nor all ones (l too large: the
    system is ill-conditioned). Grids of multiples of it (0.5x, 1x, 2x) are the intended tuning.

    Args:
        x: (N, d) support points. k: neighbour rank. max_points: subsample size. seed: subsample seed.
    """
    n = x.shape[0]
    if n < 2:
        return 1.0
    k = max(1, min(int(k), n - 1))
    if n > max_points:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=g)[:max_points].to(x.device)
        queries = x[rows]
    else:
        queries = x
    d2, _ = knn_search(queries, x, k + 1)  # the point itself is among the k + 1 (distance 0)
    kth = d2[:, k].to(torch.promote_types(d2.dtype, torch.float32)).sqrt()
    kth = kth[kth > 0]
    if kth.numel() == 0:
        return 1.0
    return float(kth.median())
