"""Neighbour search behind one interface, the DINO weighted k-NN readout, and the auto lengthscale.

``knn_search(z, x, k)`` returns the k nearest support points of every evaluation point in Euclidean
distance, sorted by distance, and among equal computed distances the lower index wins (the contract).
The computed distance is ||x||^2 - 2 z.x + ||z||^2 clamped at 0, in the search dtype: points at equal
distance in exact arithmetic whose rounded distances differ (a matmul may round the same dot product
differently in different columns) are ordered by their rounded distances; points whose distances differ
but round to the same computed value (next to a large ||z||^2) tie, and the lower index wins; data whose
distances are exact (small integers, the corners of a cube) tie exactly. Backends:

- ``"torch"`` (default): exact chunked brute force on the tensors' device. Each chunk of evaluation
  points forms the computed distances ||x||^2 - 2 z.x + ||z||^2 (one matmul and one pass), then
  selects the k + 1 smallest (``sk.select.k_smallest``: numpy's partition on the CPU, ``topk``
  elsewhere). The matmuls run at full float32 precision whatever the global TF32 setting. Memory is one
  (chunk, N) score block, sized from the device
  (``sk.budget``: 64 MiB on the CPU, up to 768 MiB on a GPU). Scores are float32 for half-precision
  inputs (a half-precision support is converted a block of rows at a time, never copied whole).
  Ties: on the CPU (float32 and float64 scores, N <= ``sk.select.NUMPY_SELECT_COLS``) each chunk
  selects with ``sk.select.k_smallest_ordered``, whose keys (a score's float32 bits above its column)
  rank ties to the lower index exactly: no tie check, no host read. Elsewhere ``topk`` does not say
  which of equal values it keeps, so each chunk asks for k + 1 sorted
  values and marks the rows where two of them are equal; after the loop (one host synchronisation per
  call, none per chunk) only those rows are redone, keeping and ordering the lower indices first.
- ``"faiss"``: exact ``IndexFlatL2`` on the CPU (float32), if faiss is installed.
- ``"faiss-ivf"``: approximate ``IndexIVFFlat`` (nlist ~ sqrt(N) cells, nprobe of them searched).

  Both keep their index with the support tensor (``sk.index``): built (IVF: trained) on the first
  search of a tensor object, reused while it is unchanged, rebuilt after an in-place change. For a
  support held across calls, an ``sk.SearchIndex`` (or ``sk.PrecomputedSupport(x, index=...)``) says so
  explicitly and measures its recall.

The search carries no gradient: the neighbour set is piecewise constant. Callers that need
differentiable distances gather the neighbours and recompute exact differences (``sk.sparse_krr``
does).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .budget import search_rows
from .precision import HALF, declared_precision
from .select import k_smallest, k_smallest_ordered
from .validation import as_chunk_size, as_k

__all__ = ["knn_search", "weighted_knn", "auto_lengthscale", "default_chunk_size", "BACKENDS"]

BACKENDS = ("torch", "faiss", "faiss-ivf")


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


def _scores(zc: Tensor, x: Tensor, x2: Tensor, out: Tensor | None, scratch: Tensor | None,
            scale: Tensor | None = None, z2: Tensor | None = None) -> Tensor:
    """The computed squared distances ||x_j||^2 - 2 z.x_j + ||z||^2, clamped at 0, of a chunk of evaluation
    points into ``out`` (rows, N): one fused addmm and one pass, or, for a support stored in another dtype
    (half precision), one addmm per block of support points converted into ``scratch``. With ``scale``
    (N,), the distances to the points s_j x_j (``x2`` then holds their squared norms): the support is
    scaled in the score block, never copied. ``out=None`` (one block, a support in the search dtype): a
    fresh block from one addmm, with fewer operations. ``z2`` (rows, 1): the chunk's squared norms, when the
    caller has them (``search_norms``)."""
    if z2 is None:
        z2 = (zc * zc).sum(1, keepdim=True)
    if out is None:
        return torch.addmm(x2, zc, x.t(), alpha=-2.0).add_(z2).clamp_min_(0.0)
    n = x.shape[0]
    nb = n if scratch is None else scratch.shape[0]
    for s in range(0, n, nb):
        xb = x if scratch is None else scratch[:min(nb, n - s)].copy_(x[s:s + nb])
        if scale is None:
            torch.addmm(x2[s:s + nb].unsqueeze(0), zc, xb.t(), alpha=-2.0, out=out[:, s:s + nb])
        else:
            torch.mm(zc, xb.t(), out=out[:, s:s + nb])
    if scale is not None:
        out.mul_(scale * -2.0).add_(x2)
    return out.add_(z2).clamp_min_(0.0)


def _norm_block_elements(x: Tensor, rows: int) -> int:
    """Elements per block of ``_sq_norms`` of a support searched with (rows, N) score blocks: 1 MiB on the
    CPU (faster than one pass); on a GPU an eighth of the score block, so that a large support takes tens
    of kernel launches, not thousands."""
    return 1 << 18 if x.device.type == "cpu" else max(1 << 18, rows * x.shape[0] // 8)


def query_sq_norms(z: Tensor, dtype: torch.dtype) -> Tensor:
    """||z_m||^2 (M, 1) of the queries in ``dtype``, without graph: what a search adds to its scores."""
    zd = z.detach() if z.requires_grad else z
    zc = zd if zd.dtype == dtype else zd.to(dtype)
    return (zc * zc).sum(1, keepdim=True)


def search_norms(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The squared norms the torch search forms its scores from: (||z_m||^2 (M, 1), ||x_j||^2 (N,)), in the
    search dtype, without graph. ``sk.sparse_krr`` computes them once, checks their sums for NaN and inf in
    place of sums of z and x (``sk.validation.device_checks``: the same inputs are refused, and a query whose
    squared norm overflows, whose scores would all be inf), and hands them to the search."""
    dtype = search_dtype(z.dtype, x.dtype)
    xd = x.detach() if x.requires_grad else x
    rows = min(search_rows(z.shape[0], x.shape[0], torch.finfo(dtype).bits // 8, z.device), z.shape[0])
    return query_sq_norms(z, dtype), _sq_norms(xd, dtype, _norm_block_elements(xd, rows))


def _search_torch(z: Tensor, x: Tensor, k: int, chunk_size: int | None,
                  scale: Tensor | None = None, values: bool = True,
                  norms: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor | None, Tensor]:
    """Exact chunked search; one host synchronisation per call (the check for boundary ties). ``scale``
    (N,): search the points s_j x_j (see ``_scores``). ``values=False``: no distances returned (None)
    by a search of one block. ``norms``: ``search_norms(z, x)``, when the caller has them."""
    m, n, d = z.shape[0], x.shape[0], x.shape[1]
    dtype = search_dtype(z.dtype, x.dtype)
    esize = torch.finfo(dtype).bits // 8
    rows = min(chunk_size or search_rows(m, n, esize, z.device), m)
    z2, x2 = norms if norms is not None else (None, _sq_norms(x, dtype, _norm_block_elements(x, rows)))
    if scale is not None:
        x2 = x2 * scale * scale
    scratch = None
    if x.dtype != dtype:
        nb = max(1, min(n, rows * n // (4 * d)))     # a quarter of the score block's elements
        scratch = torch.empty(nb, d, dtype=dtype, device=x.device)
    full = k >= n
    if rows >= m and not full and scratch is None and scale is None:
        # One block (small calls): the same steps with fewer operations.
        scores = _scores(z.to(dtype), x, x2, None, None, z2=z2)
        ordered = k_smallest_ordered(scores, k)     # ties resolved by the keys: no check, no read
        if ordered is not None:
            v, i = ordered
        else:
            v, i = k_smallest(scores, k + 1)
            if bool((v[:, 1:] == v[:, :-1]).any()):    # the call's one synchronisation
                v, i = _k_smallest_lowest_index(scores, k)
        return (v[:, :k].to(z.dtype) if values else None), i[:, :k]
    # One (rows, N) block for all chunks: a fresh block per chunk costs page faults (measured 20-30%
    # of the matmul) and, on the CPU, glibc's allocator was seen to keep GiBs of freed blocks.
    block = torch.empty(rows, n, dtype=dtype, device=z.device)
    vals = torch.empty(m, min(k, n), dtype=dtype, device=z.device)
    idx = torch.empty(m, min(k, n), dtype=torch.long, device=z.device)
    tied = None if full else torch.empty(m, dtype=torch.bool, device=z.device)
    unordered = False          # a chunk selected without ``k_smallest_ordered``: its ties are checked
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        zc = z[start:stop].to(dtype)
        scores = _scores(zc, x, x2, block[:stop - start], scratch, scale, None if z2 is None else z2[start:stop])
        if full:
            v, i = torch.sort(scores, dim=1, stable=True)
        elif (ordered := k_smallest_ordered(scores, k)) is not None:    # ties resolved by the keys
            v, i = ordered
            tied[start:stop] = False
        else:
            # topk does not promise which of equal values it keeps, nor their order. Asking for k + 1
            # sorted values shows every tie that matters (equal neighbours among the k + 1, across the
            # boundary or inside); such rows, rare for real-valued data, are redone after the loop.
            v, i = k_smallest(scores, k + 1)
            torch.any(v[:, 1:] == v[:, :-1], dim=1, out=tied[start:stop])
            v, i = v[:, :k], i[:, :k]
            unordered = True
        vals[start:stop] = v
        idx[start:stop] = i
    redo = tied.nonzero().squeeze(1) if unordered else idx[:0, 0]     # the call's one synchronisation
    if redo.numel():
        per = max(1, rows // 3)                    # the int64 keys take twice the scores' bytes
        for s in range(0, redo.shape[0], per):
            r = redo[s:s + per]
            zc = z[r].to(dtype)
            v, i = _k_smallest_lowest_index(
                _scores(zc, x, x2, block[:r.shape[0]], scratch, scale, None if z2 is None else z2[r]), k)
            vals[r] = v
            idx[r] = i
    return vals.to(z.dtype), idx


def _search_faiss(z: Tensor, x: Tensor, k: int, ivf: bool, nlist: int | None, nprobe: int | None):
    """The faiss backends: an index of x kept between calls (``sk.index.cached_index``), not rebuilt."""
    from .index import cached_index  # noqa: PLC0415 - sk.index imports this module

    return cached_index(x, "ivf" if ivf else "flat", nlist=nlist).search(z, k, nprobe=nprobe)


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
    k-th place), not once per chunk, and runs with autocast off and full-precision float32 matmuls
    (scores in float32 or wider, whatever the global TF32 setting).
    """
    k = _checked_k(z, x, k)
    chunk_size = as_chunk_size(chunk_size)
    if z.shape[0] == 0:
        return z.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=z.device)
    if backend == "torch":
        with declared_precision(z.device):
            return _search_torch(z.detach(), x.detach(), k, chunk_size)
    if backend in ("faiss", "faiss-ivf"):
        return _search_faiss(z, x, k, ivf=backend == "faiss-ivf", nlist=nlist, nprobe=nprobe)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def search_indices(z: Tensor, x: Tensor, k: int, backend: str = "torch",
                   norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The indices (M, k) of ``knn_search`` for inputs that ``sk.sparse_krr`` has validated (k <= N, M >= 1,
    the declared precision already in force): the same search without the public checks, which a small
    call would pay twice. ``norms``: ``search_norms(z, x)`` (torch backend), computed once by the caller."""
    if backend == "torch":
        return _search_torch(z.detach() if z.requires_grad else z, x.detach() if x.requires_grad else x, k, None,
                             values=False, norms=norms)[1]
    return knn_search(z, x, k, backend=backend)[1]


def _checked_k(z: Tensor, x: Tensor, k) -> int:
    """min(k, N) after the shape checks of a search."""
    k = as_k(k)
    if z.dim() != 2 or x.dim() != 2:
        raise ValueError(f"z and x must be 2-D (M, d) and (N, d), got shapes {tuple(z.shape)} and {tuple(x.shape)}")
    if z.shape[1] != x.shape[1]:
        raise ValueError(f"feature size mismatch: z has d={z.shape[1]}, x has d={x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("empty support set: x has no rows")
    return min(k, x.shape[0])


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

    The support is never normalised as a whole: the torch search scales its score block by the inverse
    norms 1 / ||x_j|| (N numbers), and only the k voters of each query are gathered (a faiss backend
    gets a normalised copy: its index copies the support anyway).
    """
    k, chunk_size = _checked_k(z, x, k), as_chunk_size(chunk_size)
    dtype = torch.promote_types(z.dtype, torch.float32)
    if z.shape[0] == 0:
        return torch.zeros(0, num_classes, dtype=dtype, device=z.device)
    with declared_precision(z.device):
        zn = torch.nn.functional.normalize(z.to(dtype), dim=1)
        # As F.normalize: x_j / max(||x_j||, 1e-12).
        inv = _sq_norms(x.detach(), dtype).sqrt_().clamp_min_(1e-12).reciprocal_()
        # On unit vectors ||z - x||^2 = 2 - 2 cos, so the Euclidean search ranks by cosine similarity.
        if backend == "torch":
            _, idx = _search_torch(zn.detach(), x.detach(), k, chunk_size, scale=inv)
        else:
            _, idx = knn_search(zn, torch.nn.functional.normalize(x, dim=1), k, backend=backend, chunk_size=chunk_size)
        voters = x.index_select(0, idx.reshape(-1)).view(*idx.shape, -1).to(dtype)          # (M, k, d)
        sims = (zn.unsqueeze(1) * voters).sum(-1) * inv[idx]
        weights = torch.exp(sims / temperature)
        scores = torch.zeros(z.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        return scores.scatter_add(1, labels.to(z.device).long()[idx], weights)


@torch.no_grad()
def auto_lengthscale(x: Tensor, k: int = 32, max_points: int = 2048, seed: int = 0) -> float:
    """Data-driven lengthscale: the median distance from a support point to its k-th nearest neighbour.

    Rule: draw up to ``max_points`` support points (a fixed-seed subsample), find for each its k-th
    nearest *other* support point (k is capped at N - 1), and return the median of these distances.
    Points whose k-th neighbour is a duplicate (distance 0) are left out of the median. Returns 1.0 when
    no positive distance exists (N < 2 or all points equal). Half-precision x is searched in float32: the
    result is finite and equals the float32 computation on the same values.

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
    # The point itself is among the k + 1 (distance 0). Half-precision points are searched with float32
    # queries, so that the distances come back in float32 (squared distances overflow float16 at 65504).
    d2, _ = knn_search(queries.to(search_dtype(queries.dtype, x.dtype)), x, k + 1)
    kth = d2[:, k].sqrt()
    kth = kth[kth > 0]
    if kth.numel() == 0:
        return 1.0
    return float(kth.median())
