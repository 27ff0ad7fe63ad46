"""Neighbour search behind one interface, the DINO weighted k-NN readout, and the auto lengthscale.

``knn_search(z, x, k)`` returns the k nearest support points of every evaluation point in Euclidean
distance, ties broken by the lower index (the contract), sorted by distance. Backends:

- ``"torch"`` (default): exact chunked brute force on the tensors' device. Each chunk of evaluation
  points forms ||x||^2 - 2 z.x (one matmul; ||z||^2 does not change the ranking so it is added to the
  k winners only), then ``topk``. Memory is one (chunk, N) block.
- ``"faiss"``: exact ``IndexFlatL2`` on the CPU (float32), if faiss is installed.
- ``"faiss-ivf"``: approximate ``IndexIVFFlat`` (nlist ~ sqrt(N) cells, nprobe of them searched).

The search carries no gradient: the neighbour set is piecewise constant. Callers that need
differentiable distances gather the neighbours and recompute exact differences (``sk.sparse_krr``
does).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["knn_search", "weighted_knn", "auto_lengthscale", "default_chunk_size", "BACKENDS"]

BACKENDS = ("torch", "faiss", "faiss-ivf")
# Elements in the (chunk, N) block of the brute-force search: 2^24 floats = 64 MiB in float32 (larger
# blocks were not faster: the matmul already runs near its rate at a few hundred rows).
SEARCH_BLOCK_ELEMENTS = 1 << 24


def default_chunk_size(rows: int, cols: int, budget: int = SEARCH_BLOCK_ELEMENTS) -> int:
    """Rows per chunk so that a (chunk, cols) block holds at most ``budget`` elements (at least 1)."""
    return max(1, min(rows, budget // max(cols, 1)))


def _order_by_distance_then_index(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by (value, index): ties go to the lower index."""
    by_index = torch.argsort(idx, dim=1)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_value = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, by_value), idx.gather(1, by_value)


def _topk_smallest(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest entries of each row, ties broken by the lower column index, sorted.

    ``topk`` does not promise which of several equal values it keeps. Asking for k + 1 tells whether a
    tie crosses the boundary (the (k+1)-th value equals the k-th); only such rows are redone with a
    stable full sort, which keeps the lower indices. Without a boundary tie the selected set is exact
    and only its order needs fixing.
    """
    n = scores.shape[1]
    if k >= n:
        vals, idx = torch.sort(scores, dim=1, stable=True)
        return vals, idx
    vals, idx = torch.topk(scores, k + 1, dim=1, largest=False, sorted=True)
    tied = vals[:, k] == vals[:, k - 1]
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        svals, sidx = torch.sort(scores[rows], dim=1, stable=True)
        vals = vals.index_put((rows,), svals[:, :k])
        idx = idx.index_put((rows,), sidx[:, :k])
    return _order_by_distance_then_index(vals, idx)


def _search_torch(z: Tensor, x: Tensor, k: int, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    m, n = z.shape[0], x.shape[0]
    chunk = chunk_size or default_chunk_size(m, n)
    x2 = (x * x).sum(1)
    # One (chunk, N) block for all chunks: a fresh block per chunk costs page faults (measured 20-30%
    # of the matmul) and, on the CPU, glibc's allocator was seen to keep GiBs of freed blocks.
    block = torch.empty(min(chunk, m), n, dtype=z.dtype, device=z.device)
    out_d, out_i = [], []
    for start in range(0, m, chunk):
        zc = z[start:start + chunk]
        # ||x||^2 - 2 z.x ranks the support points as ||z - x||^2 does; one fused addmm.
        partial = torch.addmm(x2.unsqueeze(0), zc, x.t(), beta=1.0, alpha=-2.0, out=block[:zc.shape[0]])
        vals, idx = _topk_smallest(partial, k)
        out_d.append((vals + (zc * zc).sum(1, keepdim=True)).clamp_min_(0.0))
        out_i.append(idx)
    return torch.cat(out_d), torch.cat(out_i)


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
        x: (N, d) support points.
        k: neighbours per point; k >= N returns all N.
        backend: ``"torch"`` (exact, chunked, any device), ``"faiss"`` (exact flat index, CPU) or
            ``"faiss-ivf"`` (approximate inverted file, CPU).
        chunk_size: evaluation points per chunk of the torch search (default: a (chunk, N) block of at
            most 2^24 elements).
        nlist, nprobe: cells of the IVF index and cells searched per query (defaults sqrt(N), nlist/8).

    Returns:
        sq_dists (M, k') and indices (M, k') with k' = min(k, N), sorted by distance, ties by the lower
        index (exact for ``torch`` and ``faiss``). The distances come from the matmul expansion and are
        meant for ranking; recompute exact differences where precision or gradients matter.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if z.dim() != 2 or x.dim() != 2:
        raise ValueError(f"z and x must be 2-D (M, d) and (N, d), got shapes {tuple(z.shape)} and {tuple(x.shape)}")
    if z.shape[1] != x.shape[1]:
        raise ValueError(f"feature size mismatch: z has d={z.shape[1]}, x has d={x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("empty support set: x has no rows")
    k = min(int(k), x.shape[0])
    if z.shape[0] == 0:
        return z.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=z.device)
    if backend == "torch":
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
        scores (M, C); ``scores.argmax(1)`` is the prediction.
    """
    zn = torch.nn.functional.normalize(z, dim=1)
    xn = torch.nn.functional.normalize(x, dim=1)
    # On unit vectors ||z - x||^2 = 2 - 2 cos, so the Euclidean search ranks by cosine similarity.
    _, idx = knn_search(zn, xn, k, backend=backend, chunk_size=chunk_size)
    sims = (zn.unsqueeze(1) * xn[idx]).sum(-1)
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
    kth = d2[:, k].sqrt()
    kth = kth[kth > 0]
    if kth.numel() == 0:
        return 1.0
    return float(kth.median())
