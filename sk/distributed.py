r"""SK over a support sharded across the processes of a ``torch.distributed`` group: ``sk.distributed``.

Rank r holds its shard X_r (N_r, d) of the support, with targets Y_r (N_r, c) or (N_r,), or integer labels
(N_r,); the support is the concatenation X = [X_0; X_1; ...] in rank order (global index of row i of X_r:
``starts[r] + i``). Each rank has its own queries Z_r (M_r, d); they stay there. One call, made by every
rank of the group together (each with its own queries, possibly none):

1. the queries are gathered on every rank (sum M_r rows of d: detached, for the search only);
2. every rank finds the k nearest rows of its shard for every query (``sk.knn_search``, or the shard's
   ``sk.SearchIndex``), as (squared distance, global index) candidates; a shard with fewer than k rows
   sends all it has;
3. ``all_to_all`` sends each query's candidates to the query's rank, which merges the W lists by
   (distance, global index) (``sk.index.merge_nearest``): ties go to the lower global index, as in
   ``sk.knn_search`` on X in one process;
4. each rank asks the owners for the distinct rows among its queries' winners (one ``all_to_all`` of
   indices) and receives them (one ``all_to_all`` of rows of X, one of rows of Y);
5. it solves its queries' k x k systems with ``sk.sparse_krr(z, rows, targets, indices=...)``.

The result equals ``sk.sparse_krr(Z_r, X, Y, ...)`` in one process (the same neighbours, the same local
arithmetic), for float targets and for labels (``num_classes``). Memory per rank: its shard, the gathered
queries (sum M_r x d), their candidates (sum M_r x k) and the winners' rows (at most M_r k x d): never
the whole support.

Gradients. The queries get theirs on their own rank (step 5). Shard representations or targets that
require grad (learned ones) get theirs on their owning rank: the rows of step 4 travel by an exchange
whose backward sends the gradients back the same way (an autograd ``all_to_all``). That backward is a
collective: **every rank's loss must use its output and every rank must call backward** (as under
``DistributedDataParallel``); a rank without queries gets an empty output that still carries the graph.
Per-rank shards are not replicas: keep their parameters out of a ``DistributedDataParallel`` module (its
all-reduce would average different shards' gradients), and when SK shares a process with DDP, give
``sk.distributed`` its own group (``group=torch.distributed.new_group()``) so that its collectives do not
interleave with DDP's.

Checks. Every call first exchanges a small vector per rank (shard size and d, query count, k, label
settings, dtypes, whether gradients are needed, and a local error code) so that every rank raises the
same ``ValueError`` for bad input: a shard whose d differs, ranks disagreeing on k or ``num_classes``,
non-finite values; no rank is left waiting in a collective. Without an initialised process group the
call raises at once. Backends: gloo (CPU tensors; CUDA tensors are exchanged through the CPU) and NCCL
(CUDA tensors), the same code.

Example (each of the W processes, after ``torch.distributed.init_process_group``)::

    support = sk.ShardedSupport(my_feats, my_labels, num_classes=1000)   # this rank's shard
    ls = support.auto_lengthscale(k=32)                                 # sk.auto_lengthscale of the whole X
    scores = support.sparse_krr(my_queries, k=32, lengthscale=ls)       # (M_r, 1000), as in one process
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .bank import krr_on_rows, lengthscale_rule
from .index import SearchIndex, attach_index, merge_nearest
from .knn import knn_search

__all__ = ["ShardedSupport", "sharded_krr"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool)
_FIELDS = ("error", "n", "d", "dz", "m", "k", "need", "num_classes", "labels", "y_cols", "x_dtype", "y_dtype",
           "z_dtype", "x_grad", "y_grad")
_ERRORS = {
    1: "its shard x is not a 2-D floating-point tensor",
    2: "its targets y are not (N_r,) or (N_r, c) with one row per shard row",
    3: "its integer labels need num_classes and must be (N_r,)",
    4: "its labels lie outside [0, num_classes)",
    5: "its shard x contains non-finite values (NaN or inf)",
    6: "its targets y contain non-finite values (NaN or inf)",
    7: "its queries z are not a 2-D floating-point tensor",
    8: "its queries z contain non-finite values (NaN or inf)",
    9: "lengthscale='auto' is not resolved per call (use ShardedSupport.auto_lengthscale)",
    10: "k must be an integer >= 1",
    11: "num_classes must be a positive integer",
}
_BAD = torch.empty(0, 0, dtype=torch.float32)    # stands for the tensors of a rank whose input is bad


def _group_or_raise(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sk.distributed needs an initialised process group: call "
                         "torch.distributed.init_process_group(...) first (or use sk.sparse_krr in one process)")
    return group if group is not None else dist.group.WORLD


def _comm_device(group) -> torch.device:
    """Where exchanged tensors live: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(t: Tensor, send: list[int], recv: list[int], group, comm: torch.device) -> Tensor:
    """all_to_all of rows: send[j] rows of t (in rank order) to rank j, recv[j] rows from rank j."""
    out = torch.empty((sum(recv),) + tuple(t.shape[1:]), dtype=t.dtype, device=comm)
    dist.all_to_all_single(out, t.detach().to(comm).contiguous(), recv, send, group=group)
    return out


class _ExchangeRows(torch.autograd.Function):
    """``_exchange`` whose backward sends the gradients back to the rows' owners. (torch's autograd
    ``torch.distributed.nn.functional.all_to_all_single`` does the same, but torch 2.14 deprecates it
    with a warning on every call, and its ``all_to_all`` needs equal sizes on gloo.)"""

    @staticmethod
    def forward(ctx, rows, send, recv, group, comm, out_device):
        ctx.plan = (send, recv, group, comm, rows.device)
        return _exchange(rows, send, recv, group, comm).to(out_device)

    @staticmethod
    def backward(ctx, grad):
        send, recv, group, comm, device = ctx.plan
        return _exchange(grad, recv, send, group, comm).to(device), None, None, None, None, None


def _all_gather_rows(t: Tensor, counts: list[int], group, comm: torch.device) -> Tensor:
    """The concatenation in rank order of every rank's t (counts[r], ...), through one padded all_gather."""
    most = max(counts)
    if most == 0:
        return t.new_zeros((0,) + tuple(t.shape[1:]))
    padded = torch.zeros((most,) + tuple(t.shape[1:]), dtype=t.dtype, device=comm)
    padded[:t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@dataclass
class _Plan:
    """What every rank agreed on for one call: sizes and offsets per rank, k' and the gradient flags."""

    counts: list[int]      # queries per rank
    sizes: list[int]       # shard rows per rank
    starts: list[int]      # global index of each shard's first row
    need: int              # neighbours per query, min(k (+1 for continuous), N)
    x_grad: bool
    y_grad: bool


class ShardedSupport:
    """This rank's shard of a support split across the ranks of a process group (module doc).

    Args:
        x: (N_r, d) this rank's representations (may be empty; may require grad: learned).
        y: (N_r, c) or (N_r,) float targets (may require grad), or (N_r,) integer labels with ``num_classes``.
        num_classes: C for labels (every rank the same).
        group: the process group (default: the world).
        index: None (exact search), a kind (``"ivf"``, ``"hnsw"``, ``"flat"``: an ``sk.SearchIndex`` of
            this shard, built here, once) or an ``sk.SearchIndex`` of x. An index serves a fixed shard.

    Building it needs no communication; its methods are collectives (every rank calls them together).
    """

    def __init__(self, x: Tensor, y: Tensor, *, num_classes: int | None = None, group=None,
                 index: SearchIndex | str | None = None):
        self.group = _group_or_raise(group)
        self.x, self.y, self.num_classes = x, y, num_classes
        self.index = attach_index(x, index) if isinstance(x, Tensor) and x.shape[0] > 0 else None
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.comm = _comm_device(self.group)
        self._checked = None

    # -- agreement ------------------------------------------------------------------------------------
    def _local_error(self, z: Tensor, k) -> tuple[int, str]:
        """(code, message) of this rank's first problem (0 when none): see ``_ERRORS``."""
        x, y, c = self.x, self.y, self.num_classes
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            return 1, _ERRORS[1]
        if not isinstance(y, Tensor) or y.dim() not in (1, 2) or y.shape[0] != x.shape[0]:
            return 2, _ERRORS[2] + f" (x has {x.shape[0]} rows, y has shape {tuple(getattr(y, 'shape', ()))})"
        if c is not None and (isinstance(c, bool) or not hasattr(c, "__index__") or operator.index(c) < 1):
            return 11, _ERRORS[11] + f" (got {c!r})"
        if not y.is_floating_point() and (c is None or y.dim() != 1):
            return 3, _ERRORS[3]
        if not y.is_floating_point() and y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            return 4, _ERRORS[4] + f" (num_classes={c})"
        if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
            return 7, _ERRORS[7]
        try:
            k_ok = not isinstance(k, bool) and operator.index(k) >= 1
        except TypeError:
            k_ok = False
        if not k_ok:
            return 10, _ERRORS[10] + f" (got {k!r})"
        # A shard that did not change since its last check (its version counter) is not read again.
        key = (x._version, x.data_ptr(), y._version, y.data_ptr())
        if self._checked != key:
            for t, code in ((x, 5), (y, 6)):
                if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                    return code, _ERRORS[code]
            self._checked = key
        if not bool(torch.isfinite(z.detach()).all()):
            return 8, _ERRORS[8]
        return 0, ""

    def _agree(self, z: Tensor, k: int, continuous: bool = False, auto: bool = False) -> _Plan:
        """Exchange every rank's vector of ``_FIELDS`` and check them, identically on every rank."""
        code, message = self._local_error(z, k)
        if auto and not code:
            code, message = 9, _ERRORS[9]
        x, y, z = (self.x, self.y, z) if code == 0 else (_BAD, _BAD, _BAD)
        grad = torch.is_grad_enabled()
        mine = dict(error=code, n=x.shape[0], d=x.shape[1], dz=z.shape[1], m=z.shape[0],
                    k=operator.index(k) if code == 0 else -1, need=int(continuous),
                    num_classes=-1 if self.num_classes is None else operator.index(self.num_classes),
                    labels=int(not y.is_floating_point()), y_cols=y.shape[1] if y.dim() == 2 else 0,
                    x_dtype=_DTYPES.index(x.dtype), y_dtype=_DTYPES.index(y.dtype), z_dtype=_DTYPES.index(z.dtype),
                    x_grad=int(grad and x.requires_grad), y_grad=int(grad and y.requires_grad))
        row = [mine[name] for name in _FIELDS]
        mine = torch.tensor(row, dtype=torch.long, device=self.comm)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(rows, mine, group=self.group)
        columns = torch.stack(rows).t().tolist()          # one transfer, not one per field
        table = dict(zip(_FIELDS, columns))
        _check_agreement(table, self.rank, message)
        sizes = table["n"]
        n = sum(sizes)
        starts = [sum(sizes[:r]) for r in range(self.world)]
        k = table["k"][0]
        need = min(k + 1 if continuous and k < n else k, n)
        return _Plan(table["m"], sizes, starts, need, bool(table["x_grad"][0]), bool(table["y_grad"][0]))

    # -- the collective steps -------------------------------------------------------------------------
    def _search(self, z: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
        """Steps 1-3 of the module doc: (sq_dists, global indices) (M_r, need) on z's device."""
        kk, r = plan.need, self.rank
        queries = _all_gather_rows(z.detach().to(self.comm), plan.counts, self.group, self.comm)
        total = queries.shape[0]
        d2 = torch.full((total, kk), float("inf"), dtype=z.dtype, device=self.comm)
        idx = torch.full((total, kk), -1, dtype=torch.long, device=self.comm)
        if total and plan.sizes[r]:
            q = queries.to(self.x.device)
            own = min(kk, plan.sizes[r])
            ld2, lidx = self.index.search(q, own) if self.index is not None else knn_search(q, self.x, own)
            d2[:, :own], idx[:, :own] = ld2.to(self.comm, z.dtype), lidx.to(self.comm) + plan.starts[r]
        send = [m * kk for m in plan.counts]
        recv = [plan.counts[r] * kk] * self.world
        got_d2 = _exchange(d2.reshape(-1), send, recv, self.group, self.comm)
        got_idx = _exchange(idx.reshape(-1), send, recv, self.group, self.comm)
        m = plan.counts[r]
        # (W, M_r, kk) from the W shards -> (M_r, W kk) candidates per query
        got_d2 = got_d2.view(self.world, m, kk).permute(1, 0, 2).reshape(m, self.world * kk)
        got_idx = got_idx.view(self.world, m, kk).permute(1, 0, 2).reshape(m, self.world * kk)
        best_d2, best_idx = merge_nearest(got_d2, got_idx, kk)
        return best_d2.to(z.device), best_idx.to(z.device)

    def _fetch(self, winners: Tensor, plan: _Plan, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Step 4: the distinct winners' rows of x (U, d) and y, in global order, and the winners as
        indices into them (M_r, need)."""
        unique, local = torch.unique(winners, return_inverse=True)
        unique = unique.to(self.comm)
        ends = torch.tensor([s + n for s, n in zip(plan.starts, plan.sizes)], device=self.comm)
        owner = torch.searchsorted(ends, unique, right=True)
        starts = torch.tensor(plan.starts, device=self.comm)
        want = torch.bincount(owner, minlength=self.world)
        ones = [1] * self.world
        give = _exchange(want, ones, ones, self.group, self.comm)            # rows each rank wants from me
        want_l, give_l = want.tolist(), give.tolist()
        asked = _exchange(unique - starts[owner], want_l, give_l, self.group, self.comm).to(self.x.device)
        out = []
        for table, learned in ((self.x, plan.x_grad), (self.y, plan.y_grad)):
            rows = table[asked.to(table.device)]
            if learned:
                out.append(_ExchangeRows.apply(rows, give_l, want_l, self.group, self.comm, device))
            else:
                out.append(_exchange(rows, give_l, want_l, self.group, self.comm).to(device))
        return out[0], out[1], local

    # -- public ---------------------------------------------------------------------------------------
    def search(self, z: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k nearest rows of the whole support for this rank's queries z (M_r, d): sq_dists (M_r, k')
        and global indices (M_r, k'), k' = min(k, N), sorted by distance, ties to the lower global index
        (as ``sk.knn_search`` on the concatenated support). Collective; no gradient."""
        with torch.no_grad():
            return self._search(z, self._agree(z, k))

    def sparse_krr(self, z: Tensor, k: int = 32, kernel="gaussian", lengthscale=None, ridge=1e-3, *,
                   continuous: bool = False, taper: float = 0.5, solve_dtype: torch.dtype | None = None,
                   chunk_size: int | None = None) -> Tensor:
        """``sk.sparse_krr(z, X, Y, k, ...)`` for this rank's queries z (M_r, d) over the whole sharded
        support: (M_r, c), (M_r, C) for labels or (M_r,). Collective (module doc); ``lengthscale`` is a
        number or tensor (``auto_lengthscale`` resolves ``"auto"`` over the whole support)."""
        plan = self._agree(z, k, continuous, auto=isinstance(lengthscale, str))
        with torch.no_grad():
            _, winners = self._search(z, plan)
        xs, ys, local = self._fetch(winners, plan, z.device)
        labels = not self.y.is_floating_point()
        return krr_on_rows(z, xs, ys, local, k, kernel=kernel, lengthscale=lengthscale, ridge=ridge,
                           continuous=continuous, taper=taper, solve_dtype=solve_dtype, chunk_size=chunk_size,
                           num_classes=self.num_classes if labels else None)

    def auto_lengthscale(self, k: int = 32, max_points: int = 2048, seed: int = 0) -> float:
        """``sk.auto_lengthscale`` of the whole support X (the same sample of global rows and rule), on
        every rank. Collective."""
        mine = torch.tensor([self.x.shape[0]], device=self.comm)
        sizes = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(sizes, mine, group=self.group)
        sizes = [int(s) for s in sizes]
        start = sum(sizes[:self.rank])

        def kth_sq_dist(rows: Tensor, kk: int) -> Tensor:
            own = rows[(rows >= start) & (rows < start + sizes[self.rank])] - start
            queries = self.x.detach()[own.to(self.x.device)]
            d2, _ = self.search(queries, kk + 1)
            counts = [int(((rows >= sum(sizes[:r])) & (rows < sum(sizes[:r + 1]))).sum()) for r in range(self.world)]
            return _all_gather_rows(d2[:, kk].to(self.comm), counts, self.group, self.comm)

        return lengthscale_rule(sum(sizes), k, max_points, seed, kth_sq_dist)


def _check_agreement(table: dict[str, list[int]], rank: int, message: str) -> None:
    """Raise the same ValueError on every rank when a rank's input is bad or the ranks disagree."""
    bad = [r for r, code in enumerate(table["error"]) if code]
    if bad:
        first = bad[0]
        text = message if first == rank else _ERRORS[table["error"][first]]
        raise ValueError(f"sk.distributed: rank {first}: {text}" +
                         (f" (and ranks {bad[1:]} too)" if len(bad) > 1 else ""))
    agree = {"d": "the feature size d of their shards", "k": "k", "need": "continuous",
             "num_classes": "num_classes", "labels": "whether y holds integer labels",
             "y_cols": "the number of target columns", "x_dtype": "the shards' dtype",
             "y_dtype": "the targets' dtype", "z_dtype": "the queries' dtype",
             "x_grad": "whether the shards x require grad", "y_grad": "whether the targets y require grad"}
    for field, what in agree.items():
        values = table[field]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r} has {_show(field, v)}" for r, v in enumerate(values))
            raise ValueError(f"sk.distributed: ranks disagree on {what}: {shown}")
    if any(dz != table["d"][0] for dz in table["dz"]):
        raise ValueError(f"sk.distributed: feature size mismatch: the shards have d={table['d'][0]}, the queries "
                         f"of the ranks have d={table['dz']}")
    if sum(table["n"]) == 0:
        raise ValueError("sk.distributed: empty support set: every shard is empty")


def _show(field: str, value: int):
    if field.endswith("dtype"):
        return _DTYPES[value] if value >= 0 else None
    return None if field == "num_classes" and value < 0 else value


def sharded_krr(z: Tensor, x: Tensor, y: Tensor, k: int = 32, kernel="gaussian", lengthscale=None,
                ridge=1e-3, *, num_classes: int | None = None, group=None, index=None, **options) -> Tensor:
    """``sk.sparse_krr(z, X, Y, k, ...)`` where x, y are this rank's shard of X, Y and z its queries: a
    collective, called by every rank of ``group`` (module doc). ``options``: continuous, taper,
    solve_dtype, chunk_size. For repeated calls keep a ``ShardedSupport``."""
    support = ShardedSupport(x, y, num_classes=num_classes, group=group, index=index)
    return support.sparse_krr(z, k, kernel, lengthscale, ridge, **options)
