r"""A faiss index of a fixed support, built once and searched many times: ``sk.SearchIndex``.

Kinds (faiss, CPU; faiss-GPU for ``flat`` and ``ivf`` where it is installed):

- ``"flat"``: exact brute force (``IndexFlatL2``). Rows whose k-th and (k+1)-th distances tie are redone
  by ``sk.knn_search``, so that ties go to the lower index as in the contract.
- ``"ivf"``: an inverted file (``IndexIVFFlat``): k-means splits the support into ``nlist`` cells
  (default :math:`\sqrt N`), each query scans the ``nprobe`` cells nearest to it (default ``nlist // 8``).
  The k-means is trained once, at construction, on at most ``256 * nlist`` rows drawn with a fixed seed
  (faiss's own cap per centroid), and every row is then added in blocks. A query costs about
  ``nlist + nprobe * N / nlist`` distances instead of N.
- ``"hnsw"``: a hierarchical navigable small-world graph (``IndexHNSWFlat``, ``hnsw_m`` links a node,
  ``ef_construction`` candidates while building, ``ef_search`` while searching; default
  ``max(64, 2k)``). No training; building costs far more than IVF's, searching less at high recall.
  faiss has no GPU HNSW.

Approximate kinds can miss true neighbours: measure their recall against the exact search
(``SearchIndex.recall`` or ``recall_at_k``) at the probe setting you use, never assume it. Rows for which
IVF finds fewer than k points (probed cells too small) are completed by the exact search. Every answer
is sorted by distance, ties by the lower index; the distances are faiss's (float32) and are meant for
ranking: ``sk.sparse_krr(..., indices=idx)`` recomputes exact differences for its kernels.

Kept with the support. ``sk.PrecomputedSupport(x, index="ivf")`` (or ``index=SearchIndex(x, ...)``)
holds one and its search uses it; ``sk.distributed.ShardedSupport(x, y, index=...)`` holds one per
shard; ``SearchIndex(x).search(z, k)`` gives indices for ``sk.sparse_krr(z, x, y, indices=idx)``.

``sk.knn_search(..., backend="faiss" | "faiss-ivf")`` no longer builds (and, for IVF, trains) an index
per call: it keeps one per support tensor (``cached_index``), keyed by the tensor object and its version
counter, dropped with the tensor (a weak reference) or by ``clear_cache()``. A tensor changed in place
gets a new index on its next search; a new tensor object (a slice, ``F.normalize(x)`` in every call) is a
new support each time, so hold an index (or a ``PrecomputedSupport``) where the support is reused. A
cached index costs a float32 copy of the support (faiss keeps its own).
"""
from __future__ import annotations

import math
import time
import weakref

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .budget import local_rows
from .knn import knn_search
from .validation import as_chunk_size, as_k

__all__ = ["SearchIndex", "recall_at_k", "merge_nearest", "cached_index", "clear_cache", "KINDS"]

KINDS = ("flat", "ivf", "hnsw")
ADD_BLOCK_ROWS = 1 << 18          # rows converted to float32 and added to faiss at a time (64 MiB at d = 64)


def import_faiss():
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("backend='faiss'/'faiss-ivf' and sk.SearchIndex need the faiss package "
                          "(pip install faiss-cpu); or use backend='torch'") from err
    return faiss


def merge_nearest(d2: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest of each row's candidates (M, C), sorted by (distance, index): ties to the lower index.

    Padding (distance inf, index -1) sorts last while k real candidates exist. Used to merge the top-k of
    blocks of a support (``sk.bank``), of shards (``sk.distributed``) and of faiss answers."""
    by_index = torch.sort(idx, dim=1).indices
    d2, idx = d2.gather(1, by_index), idx.gather(1, by_index)
    by_distance = torch.sort(d2, dim=1, stable=True).indices[:, :k]
    return d2.gather(1, by_distance), idx.gather(1, by_distance)


def recall_at_k(found: Tensor, exact: Tensor) -> float:
    """Mean over rows of |found_m ∩ exact_m| / k: the fraction of the exact k nearest neighbours found.

    found, exact: (M, k) indices (rows of ``exact`` hold k distinct indices)."""
    if found.shape != exact.shape:
        raise ValueError(f"found and exact must have the same shape, got {tuple(found.shape)} and "
                         f"{tuple(exact.shape)}")
    if exact.numel() == 0:
        return 1.0
    hits = 0
    rows = max(1, (1 << 24) // max(exact.shape[1] ** 2, 1))       # (rows, k, k) booleans: 16 MiB at most
    for s in range(0, exact.shape[0], rows):
        f, e = found[s:s + rows].to(exact.device), exact[s:s + rows]
        hits += int((f.unsqueeze(2) == e.unsqueeze(1)).any(2).sum())
    return hits / exact.numel()


def _as_faiss(t: Tensor):
    """A float32, C-contiguous CPU numpy view (a copy only where t is not already one)."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


class SearchIndex:
    """A faiss index of the support x (N, d), built once (module doc).

    Args:
        x: (N, d) floating-point support (held, not copied by this object; faiss keeps a float32 copy).
            It must not change in place afterwards (checked by its version counter: a search then raises).
        kind: ``"ivf"`` (default), ``"hnsw"`` or ``"flat"``.
        nlist: IVF cells (default round(sqrt(N)), at most N). nprobe: IVF cells searched per query
            (default nlist // 8, at least 1; a search may override it).
        hnsw_m, ef_construction, ef_search: HNSW graph degree, build-time and search-time candidate lists
            (``ef_search`` default max(64, 2k); a search may override it).
        train_size: IVF training rows (default min(N, 256 * nlist)), drawn with ``seed``.
        gpu: put a flat or IVF index on a GPU with faiss-GPU: None (default) does so when x is on a CUDA
            device and faiss has GPUs; True requires it.

    Attributes: ``kind``, ``n``, ``d``, ``nlist``, ``nprobe``, ``build_seconds``, ``gpu``.

    Example::

        index = sk.SearchIndex(features, "ivf")                # trained and filled once
        _, idx = index.search(queries, k=32, nprobe=16)        # (M, 32), approximate
        print(index.recall(queries, k=32, nprobe=16))          # measured against the exact search
        scores = sk.sparse_krr(queries, features, labels, k=32, num_classes=C, indices=idx)
    """

    def __init__(self, x: Tensor, kind: str = "ivf", *, nlist: int | None = None, nprobe: int | None = None,
                 hnsw_m: int = 32, ef_construction: int = 80, ef_search: int | None = None,
                 train_size: int | None = None, gpu: bool | None = None, seed: int = 0, _weak: bool = False):
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError("x must be a 2-D floating-point tensor (N, d), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[0] == 0:
            raise ValueError("empty support set: x has no rows")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        faiss = import_faiss()
        n = x.shape[0]
        self._x = weakref.ref(x) if _weak else x
        self.kind, self._version, self._ptr = kind, x._version, x.data_ptr()
        self.n, self.d = x.shape
        self.nlist = min(n, as_chunk_size(nlist, "nlist") or max(1, round(math.sqrt(n))))
        self.nprobe = min(self.nlist, as_chunk_size(nprobe, "nprobe") or max(1, self.nlist // 8))
        self.hnsw_m = as_chunk_size(hnsw_m, "hnsw_m") or 32
        self.ef_construction = as_chunk_size(ef_construction, "ef_construction") or 80
        self.ef_search = as_chunk_size(ef_search, "ef_search")
        self.gpu = _use_gpu(faiss, gpu, kind, x.device)
        train = min(n, as_chunk_size(train_size, "train_size") or 256 * self.nlist)
        self._settings = dict(nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_construction=ef_construction,
                              ef_search=ef_search, train_size=train_size, gpu=gpu, seed=seed)
        start = time.perf_counter()
        self._index, self._gpu_resources = _build_faiss(faiss, x, kind, self.nlist, self.hnsw_m,
                                                        self.ef_construction, train, seed, self.gpu)
        self.build_seconds = time.perf_counter() - start

    @property
    def x(self) -> Tensor:
        """The support (held; only through a weak reference in ``sk.knn_search``'s cache, whose entries
        must not keep their tensor alive)."""
        x = self._x() if isinstance(self._x, weakref.ref) else self._x
        if x is None:
            raise ValueError("the support tensor of this sk.SearchIndex no longer exists")
        return x

    def __repr__(self) -> str:
        extra = {"ivf": f", nlist={self.nlist}, nprobe={self.nprobe}", "hnsw": f", hnsw_m={self.hnsw_m}"}
        return f"SearchIndex(kind={self.kind!r}, n={self.n}, d={self.d}{extra.get(self.kind, '')}, gpu={self.gpu})"

    def is_current(self) -> bool:
        """Whether x is still the tensor (storage, shape and version) that the index was built from."""
        return self.x._version == self._version and self.x.data_ptr() == self._ptr

    def check_current(self) -> None:
        """ValueError if x was changed in place after the index was built."""
        if not self.is_current():
            raise ValueError("the support tensor x was modified in place after its sk.SearchIndex was built: "
                             "the index is stale; build a new one")

    @torch.no_grad()
    def search(self, z: Tensor, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[Tensor, Tensor]:
        """The k nearest support points of each query by this index (no gradient).

        Args:
            z: (M, d) queries. k: neighbours (k >= N returns all N). nprobe / ef_search: this search's
                IVF cells / HNSW candidate list (default: the index's).
        Returns:
            sq_dists (M, k') in z's dtype and indices (M, k') on z's device, k' = min(k, N), sorted by
            distance, ties by the lower index.
        """
        self.check_current()
        k = min(as_k(k), self.n)
        if z.dim() != 2 or z.shape[1] != self.d:
            raise ValueError(f"z must be (M, d={self.d}), got shape {tuple(z.shape)}")
        if z.shape[0] == 0:
            return z.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=z.device)
        self._set_search_parameters(k, nprobe, ef_search)
        exact = self.kind == "flat"
        ask = k + 1 if exact and k < self.n else k   # one more shows a tie at the boundary
        dist, idx = self._index.search(_as_faiss(z), ask)
        dist, idx = torch.from_numpy(dist), torch.from_numpy(idx).long()
        redo = (idx[:, :k] < 0).any(1)               # IVF: fewer than k points in the probed cells
        if ask > k:
            redo |= dist[:, k] == dist[:, k - 1]
        dist, idx = dist[:, :k], idx[:, :k]
        if bool(redo.any()):
            rows = redo.nonzero().squeeze(1)
            rd, ri = knn_search(z[rows.to(z.device)].to(self.x.device), self.x, k)
            dist, idx = dist.index_put((rows,), rd.cpu().float()), idx.index_put((rows,), ri.cpu())
        dist, idx = merge_nearest(dist.clamp_min(0.0), idx, k)
        return dist.to(z.device, z.dtype), idx.to(z.device)

    def recall(self, z: Tensor, k: int, exact: Tensor | None = None, **search_options) -> float:
        """recall@k of this index on the queries z against the exact search (``sk.knn_search``, or the
        exact indices (M, k') given as ``exact``)."""
        _, found = self.search(z, k, **search_options)
        if exact is None:
            _, exact = knn_search(z, self.x, k)
        return recall_at_k(found, exact[:, :found.shape[1]])

    def _set_search_parameters(self, k: int, nprobe: int | None, ef_search: int | None) -> None:
        faiss = import_faiss()
        space = faiss.GpuParameterSpace() if self.gpu else faiss.ParameterSpace()
        if self.kind == "ivf":
            probe = as_chunk_size(nprobe, "nprobe") or self.nprobe
            space.set_index_parameter(self._index, "nprobe", min(self.nlist, probe))
        elif self.kind == "hnsw":
            ef = as_chunk_size(ef_search, "ef_search") or self.ef_search or max(64, 2 * k)
            space.set_index_parameter(self._index, "efSearch", ef)

    def support_search(self, zc: Tensor, need: int, xc: Tensor, sqn: Tensor,
                       values: bool = True) -> tuple[Tensor, Tensor | None]:
        """For ``sk.PrecomputedSupport.search``: indices (M, need) found by this index, and the computed
        squared distances ||x_j||^2 - 2 z.x_j + ||z||^2 (clamped at 0) of those neighbours in zc's dtype
        (None with ``values=False``); no gradient. ``xc``, ``sqn``: the support and its squared norms in
        zc's dtype. The distances are formed from the gathered neighbours, a block of queries at a time
        within the local budget (``sk.budget``)."""
        with torch.no_grad():
            _, idx = self.search(zc, need)
            if not values:
                return idx, None
            m, d = zc.shape
            rows = local_rows(m, need * d * zc.element_size(), zc.device)
            parts = []
            for s in range(0, m, rows):
                i, zb = idx[s:s + rows], zc[s:s + rows]                      # (B, need), (B, d)
                dot = torch.bmm(xc[i], zb.unsqueeze(2)).squeeze(2)
                parts.append((sqn[i] - 2.0 * dot + (zb * zb).sum(1, keepdim=True)).clamp_min_(0.0))
            return idx, (parts[0] if len(parts) == 1 else torch.cat(parts))

    def rebuilt(self) -> "SearchIndex":
        """A new index of the same kind and settings, built from x as it is now (for
        ``PrecomputedSupport.refresh`` after a write to x that PyTorch does not count)."""
        return SearchIndex(self.x, self.kind, **self._settings)


def _use_gpu(faiss, gpu: bool | None, kind: str, device: torch.device) -> bool:
    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu is None:
        return available and device.type == "cuda" and kind != "hnsw"
    if gpu and (not available or kind == "hnsw"):
        raise ValueError("gpu=True needs faiss with GPU support (faiss-gpu) and a flat or IVF index "
                         f"(faiss has no GPU HNSW); this faiss has {faiss.get_num_gpus()} GPUs, kind={kind!r}")
    return bool(gpu)


def _build_faiss(faiss, x: Tensor, kind: str, nlist: int, hnsw_m: int, ef_construction: int, train: int,
                 seed: int, gpu: bool):
    """(the faiss index filled with x, the GPU resources it uses or None). IVF is trained here, once."""
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m)
        index.hnsw.efConstruction = ef_construction
    resources = None
    if gpu:  # pragma: no cover - needs faiss-GPU and a CUDA device
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, x.device.index or 0, index)
    if kind == "ivf":
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:train].sort().values
        index.train(_as_faiss(x[rows.to(x.device)]))
    for s in range(0, n, ADD_BLOCK_ROWS):
        index.add(_as_faiss(x[s:s + ADD_BLOCK_ROWS]))
    return index, resources


_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def cached_index(x: Tensor, kind: str, nlist: int | None = None) -> SearchIndex:
    """The index of ``x`` that ``sk.knn_search``'s faiss backends use: built on the first search of this
    tensor object, kept while it lives and is unchanged (its version counter), rebuilt after an in-place
    change. One per (kind, nlist)."""
    entries = _CACHE.get(x)
    if entries is None:
        entries = _CACHE[x] = {}
    key = (kind, nlist)
    index = entries.get(key)
    if index is None or not index.is_current() or index.x.shape != x.shape:
        index = entries[key] = SearchIndex(x, kind, nlist=nlist, _weak=True)
    return index


def clear_cache() -> None:
    """Drop every index that ``sk.knn_search``'s faiss backends keep (their float32 copies of supports)."""
    _CACHE.clear()


def attach_index(x: Tensor, index) -> SearchIndex | None:
    """The index a ``PrecomputedSupport`` of x keeps: None, a kind (built here), or a ``SearchIndex`` of x."""
    if index is None:
        return None
    if isinstance(index, str):
        return SearchIndex(x, index)
    if not isinstance(index, SearchIndex):
        raise ValueError(f"index must be None, one of {KINDS} or an sk.SearchIndex, got {type(index).__name__}")
    if index.x is not x:
        raise ValueError("the sk.SearchIndex was built on another tensor than this support's x")
    index.check_current()
    return index
