r"""A support set prepared once for many SK calls: ``sk.PrecomputedSupport``.

Many uses of SK query one fixed support set again and again: a frozen feature bank, the support of an
RL agent's head between two changes of its network, a classifier answering one query at a time. A call
``sk.sparse_krr(z, x, y)`` on a plain tensor repeats, every time, work that depends on x alone (the check
that it is finite, its squared norms for the search) and a general search's set-up, which at one query
against a few hundred points cost more than the arithmetic. ``PrecomputedSupport(x)`` does that work
once: it checks x, centres it on its mean, :math:`\tilde X = X - \mu`, and keeps the squared norms
:math:`\lVert \tilde x_j \rVert^2` (one (N, d) copy in the work dtype). A call
``sk.sparse_krr(z, support, y, ...)`` then searches with one (B, N) matmul and one selection per block of
B queries (ranking by :math:`\lVert \tilde x_j \rVert^2 - 2 \tilde z \cdot \tilde x_j`, the same order as
:math:`\lVert z - x_j \rVert^2`; centring keeps the scores of a tight cloud far from the origin apart, so
fewer of them tie when rounded; ties go to the lower index as in ``sk.knn_search``), and solves with the
plain path's local solves on the centred points (``sk.krr``: the same numerics).

With ``distances=True`` it also stores the N x N squared distances :math:`D_{ij} = \lVert x_i - x_j
\rVert^2`, of which every local k x k matrix is a sub-block: :math:`K(X_{I_m}, X_{I_m}) = k(D_{I_m, I_m})`.
Calls then gather their (B, k, k) sub-blocks instead of gathering the neighbours' features (B, k, d) and
forming their distances with a batched matmul, and take the query distances
:math:`\lVert \tilde z \rVert^2 + \lVert \tilde x_j \rVert^2 - 2 \tilde z \cdot \tilde x_j` from the
search's own scores: a call's cost no longer grows with d beyond that one matmul, and the gradient to z
goes through it alone. D costs one (N, N, d) matmul in float64 and N^2 numbers of memory: worth it for a
small support that serves many calls (at N = d = 256, k = 16 it costs about as much as the local matrices
of two calls of 64 queries).

Why float64 for D and for the scores that give the query distances. In float32 the expansion's rounding
is about eps (||x̃_i||^2 + ||x̃_j||^2), relative to the support's spread, where the local path's
(neighbours centred on their query or on their nearest neighbour) is relative to each neighbourhood.
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
- X must not change after it was prepared: an in-place change (which bumps the tensor's version) makes
  the next call raise ``ValueError``; prepare a new support instead (cheap without distances).
- ``sparse_krr(z, support, ...)`` equals ``sparse_krr(z, x, ...)`` to rounding; points whose distances
  differ by less than the scores' rounding may be ranked differently by the two searches (each is a
  correct search of its own scores).

Example::

    support = sk.PrecomputedSupport(features, distances=True)   # (N, d), no gradient
    for z in batches:                                           # many calls against the same support
        f = sk.sparse_krr(z, support, targets, k=16)            # = sk.sparse_krr(z, features, targets, k=16)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .precision import no_autocast, work_dtype

try:  # optional: a faster selection on the CPU (see k_smallest)
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed with torch almost everywhere
    _np = None

__all__ = ["PrecomputedSupport", "k_smallest"]

# CPU blocks of at least this many rows, and of at most NUMPY_SELECT_COLS support points, select with
# numpy (see k_smallest); its argpartition returns int64 positions for the whole block.
NUMPY_SELECT_ROWS = 32
NUMPY_SELECT_COLS = 4096


def k_smallest(scores: Tensor, kk: int) -> tuple[Tensor, Tensor]:
    """The kk smallest entries of each row of scores (B, N), sorted ascending: values and indices. Equal
    values come in either order (callers check for ties themselves).

    ``torch.topk`` runs, per row, an ``nth_element`` whose comparisons mispredict on data it has not seen:
    at N = 256, kk = 17 it took 2.8 us a row on this project's CPU (182 us for 64 rows). numpy's
    ``argpartition`` (introselect) took 1.6 us a row, plus a sort of the kk winners: 120 us for 64 rows.
    So CPU blocks of ``NUMPY_SELECT_ROWS`` to any rows and at most ``NUMPY_SELECT_COLS`` columns, in
    float32/float64, select with numpy; smaller blocks (where the conversions dominate), larger supports
    (numpy's int64 positions would double the block's memory), other devices and dtypes use ``topk``.
    """
    b, n = scores.shape
    if (_np is None or scores.device.type != "cpu" or b < NUMPY_SELECT_ROWS or n > NUMPY_SELECT_COLS
            or kk >= n or scores.dtype not in (torch.float32, torch.float64) or scores.requires_grad):
        return torch.topk(scores, kk, dim=1, largest=False)
    part = torch.from_numpy(_np.argpartition(scores.numpy(), kk - 1, axis=1)[:, :kk])
    v, order = torch.sort(scores.gather(1, part), dim=1)
    return v, part.gather(1, order)


class PrecomputedSupport:
    """Support representations X (N, d) prepared once for many SK calls (see the module doc).

    Args:
        x: (N, d) floating-point support representations without gradient (held, not copied).
        distances: also compute the N x N squared distances (in float64, stored in ``dtype``), so that
            calls gather their local matrices instead of forming them. Worth it for a support that serves
            many calls (it costs about a (N, N, d) float64 matmul once, and N^2 numbers of memory);
            without, calls form their local matrices from the gathered neighbours (the plain path's local
            solves, on the centred support).
        dtype: the work dtype of the calls' local systems (default: x's, at least float32; a call's
            ``solve_dtype`` overrides it for that call).

    Attributes: ``x`` (the given tensor), ``n``, ``d``, ``dtype``, ``device``, ``mean`` (d,),
    ``centred`` (N, d) = x - mean and ``sq_norms`` (N,) in ``dtype``; ``sq_dists`` (N, N) in ``dtype``
    (None without ``distances``).

    Use it as the ``x`` of ``sk.sparse_krr``, or as the ``representations`` of ``sk.SKLayer``
    (``forward(z, representations=support)``); ``sk.SKLayer(..., precompute=True)`` prepares and caches
    one for its stored representations.
    """

    def __init__(self, x: Tensor, distances: bool = False, dtype: torch.dtype | None = None):
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
        self._version = x._version
        with torch.no_grad(), no_autocast(x.device):
            xw = self.points = x if x.dtype == self.dtype else x.to(self.dtype)
            total = xw.sum()   # NaN and inf propagate to the sum: one read
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(xw).all()):
                raise ValueError("x contains non-finite values (NaN or inf)")
            self.sq_norms = (xw * xw).sum(1)
            self.sq_dists = self._x64 = self._sq64 = None
            if distances:
                x64 = self._x64 = xw.to(torch.float64)
                self._sq64 = (x64 * x64).sum(1)
                # Centred on the mean in float64, so that the matmul's rounding is relative to the support's
                # spread, not to its distance from the origin (see the module doc).
                c64 = x64 - x64.mean(0)
                sq = (c64 * c64).sum(1)
                d2 = torch.addmm(sq.unsqueeze(0), c64, c64.t(), alpha=-2.0).add_(sq.unsqueeze(1))
                self.sq_dists = d2.clamp_min_(0.0).fill_diagonal_(0.0).to(self.dtype)
        self._casts: dict = {}

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
        """ValueError if x was changed in place since it was prepared."""
        if self.x._version != self._version:
            raise ValueError("the support tensor x was modified in place after sk.PrecomputedSupport(x) was built: "
                             "what was prepared from it is stale; build a new PrecomputedSupport")

    def tensors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(points, sq_norms) in ``dtype`` (a call's ``solve_dtype``; converted once)."""
        if dtype == self.dtype:
            return self.points, self.sq_norms
        return self._cast(("tensors", dtype), lambda: (self.points.to(dtype), self.sq_norms.to(dtype)))

    def distances(self, dtype: torch.dtype) -> Tensor:
        """The squared distances (N, N) in ``dtype`` (converted once)."""
        return self.sq_dists if dtype == self.dtype else self._cast(("dist", dtype), lambda: self.sq_dists.to(dtype))

    def linear_gram(self, dtype: torch.dtype) -> Tensor:
        """X X^T (N, N) in ``dtype``, for the linear kernel (not a function of the distance); computed in
        float64 on first use."""
        return self._cast(("gram", dtype), lambda: (self._x64 @ self._x64.t()).to(dtype))

    def _transposed(self, t: Tensor) -> Tensor:
        """t.t() for the support's own tensors, made once (a view, but one tensor operation per call)."""
        key = ("t", t.data_ptr(), t.dtype)
        return self._casts[key] if key in self._casts else self._cast(key, t.t)

    def _cast(self, key, make):
        if key not in self._casts:
            with torch.no_grad():
                self._casts[key] = make()
        return self._casts[key]

    def search(self, zc: Tensor, need: int, rows: int, xc: Tensor, sqn: Tensor) -> tuple[Tensor, Tensor]:
        """The ``need`` nearest support points of the queries zc (M, d): indices (M, need), sorted by
        distance with ties to the lower index, and their scores ||x_j||^2 - 2 z.x_j (M, need) with zc's
        graph (add ||z||^2 for the distances; when ``need`` >= N, every point in index order and all N
        scores). ``xc``, ``sqn``: the support and its squared norms in zc's dtype. The scores are those of
        ``sk.knn_search`` (the same matmul), so data whose scores are exact tie exactly. One (rows, N)
        score block at a time; one host synchronisation (for ties)."""
        m, n = zc.shape[0], self.n
        xt = self._transposed(xc)
        if need >= n:  # every point: their order does not matter to the local solves
            idx = torch.arange(n, device=zc.device).expand(m, n)
            if m <= rows:
                return idx, torch.addmm(sqn, zc, xt, alpha=-2.0)
            return idx, torch.cat([torch.addmm(sqn, zc[s:s + rows], xt, alpha=-2.0) for s in range(0, m, rows)])
        if m <= rows:  # one block: the same steps with fewer operations (small calls)
            scores = torch.addmm(sqn, zc, xt, alpha=-2.0)
            v, i = k_smallest(scores.detach() if scores.requires_grad else scores, need + 1)
            if not bool((v[:, 1:] == v[:, :-1]).any()):     # the search's one synchronisation
                i = i[:, :need]
                return i, (scores.gather(1, i) if scores.requires_grad else v[:, :need])
            return self._redo(zc, i[:, :need], scores.gather(1, i[:, :need]), (v[:, 1:] == v[:, :-1]).any(1), rows,
                              xt, sqn)
        idx_parts, part_parts, tied_parts = [], [], []
        for s in range(0, m, rows):
            scores = torch.addmm(sqn, zc[s:s + rows], xt, alpha=-2.0)
            # k + 1 sorted values show every tie that matters (see sk.knn); tied rows are redone below.
            v, i = k_smallest(scores.detach(), need + 1)
            tied_parts.append((v[:, 1:] == v[:, :-1]).any(1))
            i = i[:, :need]
            idx_parts.append(i)
            part_parts.append(scores.gather(1, i) if scores.requires_grad else v[:, :need])
        idx, part, tied = torch.cat(idx_parts), torch.cat(part_parts), torch.cat(tied_parts)
        if not bool(tied.any()):      # the search's one synchronisation
            return idx, part
        return self._redo(zc, idx, part, tied, rows, xt, sqn)

    @staticmethod
    def _redo(zc, idx, part, tied, rows, xt, sqn) -> tuple[Tensor, Tensor]:
        """Redo the rows of ``search`` with equal values among their k + 1 nearest: a stable sort keeps
        equal scores in index order (the rows are few: ties of rounded scores, or duplicated points)."""
        need = idx.shape[1]
        redo = tied.nonzero().squeeze(1)
        for s in range(0, redo.shape[0], rows):
            r = redo[s:s + rows]
            scores = torch.addmm(sqn, zc[r], xt, alpha=-2.0)
            ri = torch.sort(scores.detach(), dim=1, stable=True).indices[:, :need]
            idx = idx.index_put((r,), ri)
            part = part.index_put((r,), scores.gather(1, ri))
        return idx, part
