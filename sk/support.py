r"""A support set prepared once for many SK calls: ``sk.PrecomputedSupport``.

Many uses of SK query one fixed support set again and again: a frozen feature bank, the support of an
RL agent's head between two changes of its network, a classifier answering one query at a time. A call
``sk.sparse_krr(z, x, y)`` on a plain tensor repeats, every time, work that depends on x alone (the check
that it is finite, its squared norms for the search) and a general search's set-up, which at one query
against a few hundred points cost more than the arithmetic. ``PrecomputedSupport(x)`` does that work
once: it checks x and keeps its squared norms :math:`\lVert x_j \rVert^2` (and a copy of x in the work
dtype when x has another one). A call ``sk.sparse_krr(z, support, y, ...)`` then searches with one (B, N)
matmul and one selection per block of B queries, ranking by the computed squared distances
:math:`\lVert x_j \rVert^2 - 2 z \cdot x_j + \lVert z \rVert^2` (clamped at 0) exactly as ``sk.knn_search``
does (the same matmul; among equal computed distances the lower index wins), and solves with the plain
path's local solves (``sk.krr``: the same numerics). It also keeps what calls would otherwise redo per
call: the ``lengthscale="auto"`` of each k, casts to a call's ``solve_dtype``, the tables below.

With ``distances=True`` it also stores the N x N squared distances :math:`D_{ij} = \lVert x_i - x_j
\rVert^2`, of which every local k x k matrix is a sub-block: :math:`K(X_{I_m}, X_{I_m}) = k(D_{I_m, I_m})`.
Calls then gather their (B, k, k) sub-blocks instead of gathering the neighbours' features (B, k, d) and
forming their distances with a batched matmul, and take the query distances
:math:`\lVert z \rVert^2 + \lVert x_j \rVert^2 - 2 z \cdot x_j` from the
search's own distance block: a call's cost no longer grows with d beyond that one matmul. The gradient to z
goes through the k selected distances only (2 (z - x_j) each, from the gathered neighbours in the
backward), never through the (rows, N) block: memory and backward stay O(M k d), as on the plain path.
A kernel of the dot product (``sk.DotProductKernel``) gets its own table, X X^T, computed on first use
(``Kernel.support_table``): every kernel says which table it needs. D costs one (N, N, d) matmul in float64 and N^2 numbers of memory: worth it for a
small support that serves many calls (at N = d = 256, k = 16 it costs about as much as the local matrices
of two calls of 64 queries).

Why float64 for D and for the scores that give the query distances. In float32 the expansion's rounding
is about eps (||x_i||^2 + ||x_j||^2) (D itself is formed after centring the support on its mean: relative
to the support's spread), where the local path's
(neighbours centred on their query) is relative to each neighbourhood.
Tried on a Double DQN head (256 unit-norm features of replay states, auto lengthscales 0.02-0.09):
float32 distances moved the kernel values by 1e-3, 14% of the local factorisations failed and needed
jitter (none on the local path), and the outputs moved by up to 1% against float64. In float64 each
entry is exact to the work dtype's rounding, and scores that float32 would tie are ranked.

What it supports, and what it does not:

- Every kernel, float targets or integer labels (``num_classes``), ``continuous=True``, learned
  targets, lengthscale and ridge (tensors that require grad get their gradients), ``indices=`` (a search
  reused), ``solve_dtype``, chunking by the device's budgets (``sk.budget``).
- No gradient reaches X: the support is fixed, and a tensor that requires grad is refused (for learned
  representations pass the tensor itself).
- X must not change after it was prepared: an in-place change through PyTorch (which bumps the tensor's
  version counter) makes the next call raise ``ValueError``. A write that PyTorch does not count (through
  ``x.data``, a numpy view of x, DLPack, another process) cannot be seen without reading all of x at
  every call: the support then answers for the old x. Call ``support.refresh()`` after such a write (it
  redoes the preparation in place, so every holder of the support sees it), or prepare a new support.
- ``sparse_krr(z, support, ...)`` equals ``sparse_krr(z, x, ...)`` to rounding (a float64 query against
  a float32 support is solved in float64, as on the plain path); with ``distances=True`` the search runs
  in float64, so points whose distances differ by less than float32's rounding may be ranked
  differently from the plain float32 search (each is a correct search of its own computed distances).

Example::

    support = sk.PrecomputedSupport(features, distances=True)   # (N, d), no gradient
    for z in batches:                                           # many calls against the same support
        f = sk.sparse_krr(z, support, targets, k=16)            # = sk.sparse_krr(z, features, targets, k=16)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .index import attach_index
from .functions import outside_transforms
from .select import NUMPY_SELECT_COLS, NUMPY_SELECT_ROWS, k_smallest, k_smallest_ordered  # noqa: F401 - re-exported
from .kernels import Kernel
from .knn import query_sq_norms
from .precision import declared_precision, work_dtype


__all__ = ["PrecomputedSupport", "k_smallest"]

class PrecomputedSupport:
    """Support representations X (N, d) prepared once for many SK calls (see the module doc).

    Args:
        x: (N, d) floating-point support representations without gradient (held, not copied).
        distances: also compute the N x N squared distances (in float64, stored in ``dtype``), so that
            calls gather their local matrices instead of forming them. Worth it for a support that serves
            many calls (it costs about a (N, N, d) float64 matmul once, and N^2 numbers of memory);
            without, calls form their local matrices from the gathered neighbours (the plain path's local
            solves).
        dtype: the work dtype of the calls' local systems (default: x's, at least float32; a call's
            ``solve_dtype`` overrides it for that call).
        index: None (exact search), ``"ivf"``, ``"hnsw"``, ``"flat"`` or an ``sk.SearchIndex`` of x: calls
            then take their neighbours from this faiss index, built once (``sk.index``; approximate for IVF
            and HNSW: measure its recall).

    Attributes: ``x`` (the given tensor), ``n``, ``d``, ``dtype``, ``device``, ``points`` (N, d) (x in
    ``dtype``: x itself when it has that dtype) and ``sq_norms`` (N,) in ``dtype``; ``sq_dists`` (N, N) in
    ``dtype`` (None without ``distances``). ``refresh()`` prepares again after a write to x that PyTorch
    does not count (see the module doc).

    Use it as the ``x`` of ``sk.sparse_krr``, or as the ``representations`` of ``sk.SKLayer``
    (``forward(z, representations=support)``); ``sk.SKLayer(..., precompute=True)`` prepares and caches
    one for its stored representations.
    """

    def __init__(self, x: Tensor, distances: bool = False, dtype: torch.dtype | None = None, index=None):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"x must be a 2-D floating-point tensor (N, d), got shape {tuple(x.shape)} and {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("empty support set: x has no rows")
        if x.requires_grad:
            raise ValueError("a precomputed support is fixed and gets no gradient, but x requires grad: pass "
                             "x.detach() if none should reach it, or the tensor itself to sparse_krr for learned "
                             "representations")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.x = x
        self.dtype = dtype or work_dtype(x.dtype)
        self._distances = distances
        self.index = None
        self.refresh()
        self.index = attach_index(x, index)

    def refresh(self) -> "PrecomputedSupport":
        """Prepare again from x as it is now, in place (every holder of this support sees it); returns self.

        For writes to x that PyTorch's version counter does not see (``x.data.mul_(2)``, a numpy view, DLPack):
        the support cannot detect them (see the module doc). Prepared tensors are made outside inference
        mode and outside ``torch.func`` transforms, so that a support prepared under ``torch.inference_mode``
        or inside a transform serves later calls that need a graph.
        """
        x = self.x
        with torch.no_grad(), torch.inference_mode(False), outside_transforms(x), declared_precision(x.device):
            xw = x if x.dtype == self.dtype else x.to(self.dtype)
            total = xw.sum()   # NaN and inf propagate to the sum: one read
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(xw).all()):
                raise ValueError("x contains non-finite values (NaN or inf)")
            self.points, self.sq_norms = xw, (xw * xw).sum(1)
            self._casts: dict = {}
            self.sq_dists = None
            if self._distances:
                self.sq_dists = self.table(Kernel, self.dtype)
        self._version = x._version
        if self.index is not None:
            self.index = self.index.rebuilt()
        return self

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def has_distances(self) -> bool:
        return self.sq_dists is not None

    def __repr__(self) -> str:
        return (f"PrecomputedSupport(n={self.n}, d={self.d}, distances={self.has_distances}, dtype={self.dtype}, "
                f"device={self.device})")

    def check_current(self) -> None:
        """ValueError if x was changed in place (through PyTorch) since it was prepared."""
        if self.x._version != self._version:
            raise ValueError("the support tensor x was modified in place after sk.PrecomputedSupport(x) was built: "
                             "what was prepared from it is stale; call support.refresh() or build a new "
                             "PrecomputedSupport")

    def tensors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(points (N, d), sq_norms (N,)) in ``dtype`` (a call's work dtype; converted once, the norms
        computed in ``dtype``)."""
        if dtype == self.dtype:
            return self.points, self.sq_norms

        def convert():
            xd = self.points.to(dtype)
            return xd, (xd * xd).sum(1)
        return self._cast(("tensors", dtype), convert)

    def distances(self, dtype: torch.dtype) -> Tensor:
        """The squared distances (N, N) in ``dtype`` (converted once); needs ``distances=True``."""
        return self.sq_dists if dtype == self.dtype else self._cast(("dist", dtype), lambda: self.sq_dists.to(dtype))

    def table(self, kern, dtype: torch.dtype) -> Tensor:
        """The (N, N) table of the kernel class ``kern``'s pairwise quantity (``kern.support_table``: squared
        distances, or dot products for a ``sk.DotProductKernel``), computed in float64 on first use and kept
        in ``dtype``."""
        key = ("table", kern.support_table.__func__, dtype)
        return self._cast(key, lambda: kern.support_table(self.tensors(torch.float64)[0]).to(dtype))

    def auto_lengthscale(self, k: int) -> float:
        """``sk.auto_lengthscale(x, k)``, computed once per k."""
        from .knn import auto_lengthscale  # noqa: PLC0415 - sk.knn imports this module
        return self._cast(("auto", k), lambda: auto_lengthscale(self.x, k=k))

    def transposed(self, t: Tensor) -> Tensor:
        """t.t() for one of the support's own tensors (the points of ``tensors``), made once: a view, but
        one tensor operation per call saved (what the searches multiply the queries by)."""
        key = ("t", t.data_ptr(), t.dtype)
        return self._casts[key] if key in self._casts else self._cast(key, t.t)

    def _cast(self, key, make):
        if key not in self._casts:
            with torch.no_grad(), torch.inference_mode(False), outside_transforms(self.x):
                self._casts[key] = make()
        return self._casts[key]

    @property
    def searches_plain(self) -> bool:
        """Whether ``sk.sparse_krr`` searches this support by ``search`` in its work dtype (no stored distances,
        no faiss index): then the queries' squared norms can be computed once (``query_norms``)."""
        return not self.has_distances and self.index is None

    def query_norms(self, z: Tensor, solve_dtype: torch.dtype | None = None) -> Tensor:
        """||z_m||^2 (M, 1) in the work dtype of a call with ``solve_dtype`` (no graph): what ``search`` adds to
        its scores, and what ``sk.sparse_krr``'s finite check of z sums."""
        return query_sq_norms(z, solve_dtype or work_dtype(z.dtype, self.dtype))

    @torch.no_grad()
    def search(self, zc: Tensor, need: int, rows: int, xc: Tensor, sqn: Tensor,
               values: bool = True, zsq: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The ``need`` nearest support points of the queries zc (M, d): indices (M, need) and their squared
        distances (M, need), sorted by computed distance, ties to the lower index (when ``need`` >= N, every
        point in index order and all N distances). No gradient: the distances are for ranking and for
        values (``sk.krr`` gives the query its gradient through the selected ones alone).

        ``xc``, ``sqn``: the support and its squared norms in zc's dtype. The computed distance is
        ||x_j||^2 - 2 z.x_j + ||z||^2 clamped at 0, from the same matmul as ``sk.knn_search``, ranked as the
        contract says: among equal computed distances the lower index wins. One (rows, N) block at a time;
        one host synchronisation (for ties), none when one block's selection orders its ties itself
        (``sk.select.k_smallest_ordered``, CPU). ``values=False``: the distances are not returned (None).
        ``zsq``: the queries' squared norms (``query_norms``), when the caller has them."""
        if self.index is not None and need < self.n:   # the neighbours of the support's faiss index
            return self.index.support_search(zc, need, xc, sqn, values)
        m, n = zc.shape[0], self.n
        xt = self.transposed(xc)
        if zsq is None:
            zsq = (zc * zc).sum(1, keepdim=True)
        starts = range(0, m, rows)
        if need >= n:  # every point: their order does not matter to the local solves
            idx = torch.arange(n, device=zc.device).expand(m, n)
            return idx, _cat([_distance_block(zc, zsq, s, rows, xt, sqn) for s in starts])
        idx_parts, d_parts, tied_parts = [], [], []
        first = _distance_block(zc, zsq, 0, rows, xt, sqn)
        ordered = k_smallest_ordered(first, need) if m <= rows else None
        if ordered is not None:       # ties resolved by the keys: no check, no read
            return ordered[1], (ordered[0] if values else None)
        for s in starts:
            # k + 1 sorted values show every tie that matters (see sk.knn); tied rows are redone below.
            v, i = k_smallest(first if s == 0 else _distance_block(zc, zsq, s, rows, xt, sqn), need + 1)
            tied_parts.append(v[:, 1:] == v[:, :-1])
            idx_parts.append(i[:, :need])
            d_parts.append(v)
        idx, v, tied = _cat(idx_parts), _cat(d_parts), _cat(tied_parts)
        if not bool(tied.any()):      # the search's one synchronisation
            return idx, (v[:, :need] if values else None)
        d2, tied = v[:, :need], tied.any(1)
        redo = tied.nonzero().squeeze(1)
        for s in range(0, redo.shape[0], rows):
            # A stable sort keeps equal distances in index order (the rows are few: ties, duplicated points).
            r = redo[s:s + rows]
            v, i = torch.sort(_distance_block(zc[r], zsq[r], 0, rows, xt, sqn), dim=1, stable=True)
            idx, d2 = idx.index_put((r,), i[:, :need]), d2.index_put((r,), v[:, :need])
        return idx, (d2 if values else None)


def _distance_block(zc: Tensor, zsq: Tensor, start: int, rows: int, xt: Tensor, sqn: Tensor) -> Tensor:
    """Computed squared distances ||x_j||^2 - 2 z.x_j + ||z||^2, clamped at 0, of the queries
    zc[start:start + rows] (rows, N)."""
    if start == 0 and zc.shape[0] <= rows:
        return torch.addmm(sqn, zc, xt, alpha=-2.0).add_(zsq).clamp_min_(0.0)
    stop = start + rows
    return torch.addmm(sqn, zc[start:stop], xt, alpha=-2.0).add_(zsq[start:stop]).clamp_min_(0.0)


def _cat(parts: list) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
