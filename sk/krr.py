r"""Sparse Kernel (local kernel ridge regression) and exact kernel ridge regression, functional API.

Sparse Kernel (SK): for each evaluation point z_m with I_m its k nearest support points,

.. math::
    \alpha_m = (K(X_{I_m}, X_{I_m}) + \lambda I_k)^{-1} Y_{I_m}, \qquad f(z_m) = K(z_m, X_{I_m})\, \alpha_m .

Exact KRR: :math:`f(Z) = K(Z, X) (K(X, X) + \lambda I_N)^{-1} Y`. With k >= N the two agree, and
``lengthscale="auto"`` resolves by one rule in both: exact KRR is SK with k = N, so "auto" is
``sk.auto_lengthscale(x, k=min(k, N))`` in ``sparse_krr`` and ``sk.auto_lengthscale(x, k=N)`` in
``exact_krr``.

Classification with integer labels (``y`` an integer (N,) tensor and ``num_classes=C``). By linearity
in Y, with one-hot targets,

.. math::
    f_c(z) = \sum_{j \in I(z),\, y_j = c} \beta_j, \qquad \beta = (K(X_I, X_I) + \lambda I)^{-1} K(X_I, z),

so each system is solved once for beta (one right-hand side) and beta is scatter-added by label: the
one-hot targets (N, C) and their gathered (M, k, C) copies never exist, and the cost does not grow with
C beyond writing the (M, C) scores. The scores equal those of ``y = one_hot(labels, C)`` to rounding.

Continuous SK (``continuous=True``). The hard cut makes f jump where the neighbour set changes (a
k-th and a (k+1)-th neighbour swap places). The continuous variant weights each of the k + 1 nearest
neighbours by

.. math::
    \omega_j = s\!\left(\frac{r_{k+1}^2 - r_j^2}{\tau\,(r_{k+1}^2 - r_1^2)}\right), \qquad
    s(t) = 3t^2 - 2t^3 \text{ on } [0, 1] \text{ (clamped outside)},

so the weight vanishes at the (k+1)-th neighbour distance, and solves the weighted local system

.. math::
    f(z) = K(z, X_I)\, \Omega\, (\Omega K(X_I, X_I) \Omega + \lambda I)^{-1}\, \Omega\, Y_I,
    \qquad \Omega = \mathrm{diag}(\omega),

which is KRR with a per-point ridge lambda / omega_j^2: a point whose weight goes to 0 leaves the
system continuously. Every r_j and r_{k+1} (an order statistic) is continuous in z, so f is continuous
in z (needs lambda > 0; with lambda = 0 a zero weight makes the system singular and only jitter saves
it). ``taper`` (tau in (0, 1]) is the fraction of the squared-distance range r_1^2..r_{k+1}^2 over which
weights fall from 1 to 0. When the k + 1 distances are all equal (to rounding), the range is 0 and the
weights are 0/0: the neighbour set is then ambiguous at the boundary, and the variant gives weight 1 to
the first k (the search's order: ties to the lower index) and 0 to the (k+1)-th, which is the hard
variant's answer. When r_1 = ... = r_k < r_{k+1} all k weights are 1: the hard answer again. Use the
hard variant for plain readouts and classification (it is the contract's SK and equals KRR for k >= N);
use the continuous one when f is optimised through z (a policy or a learned input, a test-time
optimiser, an ODE) or when jumps would hurt a smoothness argument. It costs one more neighbour per
system.

Numerics and cost. The evaluation points are processed in chunks whose size comes from the device's
memory budget (``sk.budget``; ``chunk_size`` overrides it), by one runner (``sk.chunks``: the loop, the
re-run of chunks whose factorisation failed, and the threads). Per chunk, the neighbours are gathered,
and the kernel forms the local values from them (``Kernel.local``: stationary kernels centre the
neighbours on their query, outside the graph when only the query needs a gradient, and form every
distance from one batched matmul). Each system is factorised once by ``cholesky_ex`` outside the
graph; when the system itself needs a gradient (a learned support, lengthscale or ridge) the solve has
its own backward (``sk.linalg.solve_quadratic``: one triangular solve and an outer product, where
autograd's chain through the factorisation costs several batched solves and matmuls), run on one thread
like the forward. A failed factorisation (a singular or indefinite system) is not looked at inside the
loop: every chunk records on the device whether it had
one, and after the loop one host synchronisation finds such chunks, which are recomputed with jitter
escalation (``sk.robust_cholesky``). Input validation (``sk.validation``) that needs the device is one
fused check, one synchronisation per call (the finite checks of z and x sum the squared norms that the
search computes anyway, ``sk.knn.search_norms``, instead of reading z and x once more); on the CPU its
values are read as Python numbers, and hyperparameters that need no gradient are used as numbers from
then on (a small call is a few dozen tensor operations, each of which costs microseconds: one fewer
matters). A CPU call that fits one score block and one chunk of local solves, with no graph or a graph
to the queries alone (the commonest small calls: inference, and learned queries against a fixed support)
skips the search's and the chunk runner's layers (``_one_block_krr``: the same functions in the same
order, so the same bits and the same graph). A fixed support queried many times can be prepared once
(``sk.PrecomputedSupport``, ``sk.support``). Without any tensor that needs a gradient, the gathered
neighbours go to one buffer reused by every chunk (fresh blocks cost page faults on
the CPU); with one, every chunk gets fresh memory, since autograd keeps it.

Precision: float16 / bfloat16 inputs are searched in float32 and solved in float32 (or
``solve_dtype``), and the result has z's dtype; autocast is switched off inside, and float32 matmuls run
at full precision whatever the global TF32 setting (``sk.precision``).
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .budget import local_rows, search_rows
from .chunks import chunk_rows, run_chunks
from .functions import apply, functorch_active, outside_transforms
from .kernels import Kernel
from .knn import auto_lengthscale, default_chunk_size, search_indices, search_norms
from .linalg import robust_cholesky, serial_lapack, solve_quadratic, solve_spd
from .precision import declared_precision, work_dtype
from .select import k_smallest_ordered
from .support import PrecomputedSupport, _distance_block
from .validation import (as_chunk_size, as_k, as_num_classes, check_hyperparameter, check_indices, check_shapes,
                         check_taper, device_checks, resolve_kernel)

__all__ = ["sparse_krr", "exact_krr", "continuity_weights"]


# -- the local solves ---------------------------------------------------------------------------------
def continuity_weights(sq_dist: Tensor, taper: float) -> Tensor:
    """omega (B, k+1) for the k+1 nearest squared distances (B, k+1), in the search's order; 0 at the
    farthest. All k+1 equal (to rounding): 1 for the first k, 0 for the last (see the module doc)."""
    hi = sq_dist.max(1, keepdim=True).values
    lo = sq_dist.min(1, keepdim=True).values
    eps = torch.finfo(sq_dist.dtype).eps
    span = hi - lo
    t = ((hi - sq_dist) / (taper * span).clamp_min(torch.finfo(sq_dist.dtype).tiny)).clamp(0.0, 1.0)
    w = t * t * (3.0 - 2.0 * t)
    # Distances computed from one matmul agree to ~eps r^2; a range below that is a tie of all k + 1.
    tie = span <= 16.0 * eps * hi
    hard = torch.ones_like(w[:1])
    hard[:, -1] = 0.0
    return torch.where(tie, hard, w)


def local_solve(kzx: Tensor, kxx: Tensor, d2z: Tensor | None, yg: Tensor, eye: Tensor, ridge, continuous: bool,
                taper: float, num_classes: int | None, robust: bool):
    """The local solves of one chunk from its kernel values: kzx (B, k), kxx (B, k, k) (this chunk's own
    block: modified in place when it carries no graph), the squared query distances d2z (B, k) (read by
    the continuous variant only), yg (B, k, c) targets or (B, k) labels, ``eye`` (k, k) and the ridge (a
    float, or a 0-dim tensor that may carry a gradient).
    Returns the outputs (B, c) and (unless ``robust``) a 0-dim device flag: did a factorisation fail."""
    if continuous:
        omega = continuity_weights(d2z, taper)
        kxx = omega.unsqueeze(2) * kxx * omega.unsqueeze(1)
        kzx = kzx * omega
    if isinstance(ridge, Tensor):
        system = kxx + ridge * eye
    elif kxx.requires_grad:
        system = torch.add(kxx, eye, alpha=ridge)
    else:
        system = kxx.add_(eye, alpha=ridge)
    # The factor carries no graph: the solves' own backward differentiates through the system.
    plain = system.detach() if system.requires_grad else system
    if robust:
        chol, failed = robust_cholesky(plain), None
    else:
        with serial_lapack(plain):
            chol, info = torch.linalg.cholesky_ex(plain)
        failed = info.any()
    if num_classes is None:
        return solve_quadratic(kzx, system, yg * omega.unsqueeze(2) if continuous else yg, chol), failed
    # beta = (K + lambda I)^{-1} k_z, then f_c = sum of beta over the neighbours labelled c.
    beta = solve_spd(system, kzx.unsqueeze(2), chol).squeeze(2)
    if continuous:
        beta = beta * omega
    return beta.new_zeros(beta.shape[0], num_classes).scatter_add(1, yg, beta), failed


_EYES: dict = {}


def _eye(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached identity (k, k): small calls would otherwise spend a few percent of their time making it.
    Made outside inference mode, so that a call under ``torch.inference_mode`` leaves no inference tensor
    for a later call that saves it for backward."""
    key = (k, dtype, device)
    eye = _EYES.get(key)
    if eye is None:
        if len(_EYES) > 64:
            _EYES.clear()
        with torch.inference_mode(False), outside_transforms():
            eye = _EYES[key] = torch.eye(k, dtype=dtype, device=device)
    return eye


def _needs_graph(*values) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad for v in values)


def _scalar(value, dtype: torch.dtype):
    """A hyperparameter for the arithmetic: a tensor in ``dtype``, or a Python float (``sparse_krr`` turns
    CPU tensors that need no gradient into floats with the values its checks read: a float saves a tensor
    operation at every use)."""
    return value.to(dtype) if isinstance(value, Tensor) else float(value)


def _rows(m: int, k: int, d: int, c: int, labels: bool, work: torch.dtype, device: torch.device,
          chunk_size: int | None, graph: bool) -> int:
    """Evaluation points per chunk of local solves. One point's working set: its gathered neighbours
    (k, d) (d = 0 when the local matrices are gathered from a table), a few k x k matrices, its gathered
    targets (k, c) or labels and beta, and its output row."""
    row_bytes = (torch.finfo(work).bits // 8) * (k * (d + 4 * k + (1 if labels else c)) + c)
    return chunk_size or chunk_rows(m, local_rows(m, row_bytes, device), device, graph)


def _gather(t: Tensor, ic: Tensor) -> Tensor:
    """Rows of t (N, d) at the indices ic (B, k) -> (B, k, d), or entries of t (N,) -> (B, k): one tensor
    operation (``embedding`` is ``index_select`` underneath, and its backward was measured 3x faster;
    ``torch.embedding`` itself, without the argument handling of ``torch.nn.functional.embedding``)."""
    return torch.take(t, ic) if t.dim() == 1 else torch.embedding(t, ic)


def _gather_targets(y: Tensor, ic: Tensor, labels: bool, work: torch.dtype) -> Tensor:
    """The targets of the neighbours ic (B, k): (B, k) labels or (B, k, c) targets in ``work``."""
    yg = _gather(y, ic)
    return yg if labels or yg.dtype == work else yg.to(work)


def sparse_krr_core(z: Tensor, x: Tensor, y: Tensor, idx: Tensor, kern: type[Kernel], lengthscale, ridge,
                    chunk_size: int | None = None, solve_dtype: torch.dtype | None = None,
                    continuous: bool = False, taper: float = 0.5, num_classes: int | None = None) -> Tensor:
    """SK on validated inputs: neighbour indices idx (M, k), nearest first -> (M, c). No checks here.

    ``y`` is (N, c) float targets, or (N,) integer labels with ``num_classes`` (the label path). Written so
    that a small call (one query, a few hundred support points) stays a few dozen tensor operations:
    hyperparameters that need no gradient are Python numbers (``_scalar``), the identity is cached, and
    one chunk runs without the chunk machinery.
    """
    m, d = z.shape
    k = idx.shape[1]
    work = work_dtype(z.dtype, x.dtype, solve_dtype=solve_dtype)
    ls, lam = _scalar(lengthscale, work), _scalar(ridge, work)
    labels = num_classes is not None
    c = num_classes if labels else y.shape[1]
    if m == 0:
        return z.new_zeros(0, c)
    graph = _needs_graph(z, x, None if labels else y, ls, lam)
    rows = _rows(m, k, d, c, labels, work, z.device, chunk_size, graph)
    eye = _eye(k, work, z.device)
    # Without a graph, the gathered neighbours, the one large per-chunk tensor, go to a buffer reused by
    # every chunk (one per worker thread).
    reuse = not graph and x.dtype == work and rows < m
    buffers = threading.local() if reuse else None

    def run(start: int, robust: bool):
        ic = idx[start:start + rows] if rows < m else idx
        b = ic.shape[0]
        if reuse:
            buffer = getattr(buffers, "xg", None)
            if buffer is None:
                buffer = buffers.xg = x.new_empty(min(rows, m) * k, d)
            xg = torch.index_select(x, 0, ic.reshape(-1), out=buffer[:b * k]).view(b, k, d)
        else:
            xg = _gather(x, ic)
            if xg.dtype != work:
                xg = xg.to(work)
        zc = z[start:start + rows] if rows < m else z
        kzx, kxx, d2z = kern.local(zc if zc.dtype == work else zc.to(work), xg, ls)
        yg = _gather_targets(y, ic, labels, work)
        return local_solve(kzx, kxx, d2z, yg, eye, lam, continuous, taper, num_classes, robust)

    out = run_chunks(run, m, rows, z.device, graph)
    return out if out.dtype == z.dtype else out.to(z.dtype)


class _SelectedSqDists(torch.autograd.Function):
    r"""d_{mj} = ||z_m - x_{I_{mj}}||^2 (M, k) for the selected neighbours only: the values come from the
    search (computed once, in float64, without graph), the gradient is 2 \sum_j g_{mj} (z_m - x_{I_{mj}}),
    formed in z's dtype. A gather from a (rows, N) score block that carries a graph would keep each whole
    block for backward and make the backward dense in N (an (M, N) gradient and an (M, N) x (N, d) product).
    The backward's \sum_j g_{mj} x_{I_{mj}} is one ``embedding_bag`` (a weighted sum of the k rows per query):
    it never forms the (M, k, d) gathered block, whose fresh memory alone (page faults) cost more than the
    arithmetic in small calls."""

    @staticmethod
    def forward(z: Tensor, x: Tensor, idx: Tensor, d2: Tensor) -> Tensor:
        return d2.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, x, idx, _ = inputs
        ctx.save_for_backward(z, x, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, x, idx = ctx.saved_tensors
        pulled = torch.nn.functional.embedding_bag(idx, x, per_sample_weights=grad.contiguous(), mode="sum")
        return torch.addcmul(pulled, grad.sum(1, keepdim=True), z, value=-1.0).mul(-2.0), None, None, None


def support_krr_core(z: Tensor, sup: PrecomputedSupport, y: Tensor, indices: Tensor | None, need: int,
                     kern: type[Kernel], lengthscale, ridge, chunk_size: int | None = None,
                     solve_dtype: torch.dtype | None = None, continuous: bool = False, taper: float = 0.5,
                     num_classes: int | None = None, zsq: Tensor | None = None) -> Tensor:
    """SK against a prepared support (``sk.support``) on validated inputs -> (M, c). No checks here.
    ``zsq``: ``sup.query_norms(z, solve_dtype)``, when the caller has them.

    The work dtype is the plain path's (``solve_dtype``, else the wider of z's and the support's). Without
    a stored table the search is the support's own (``PrecomputedSupport.search``) and the local solves
    are the plain path's (``sparse_krr_core``). With one (``distances=True``) the search runs in float64,
    its distances give the query's kernel values, and each chunk gathers its (B, k, k) sub-blocks of the
    table of the kernel's pairwise quantity (``Kernel.support_table``).
    """
    m = z.shape[0]
    work = solve_dtype or work_dtype(z.dtype, sup.dtype)
    zw = z if z.dtype == work else z.to(work)
    if not sup.has_distances:
        xw, sqn = sup.tensors(work)
        idx = indices
        if idx is None:
            rows = search_rows(m, sup.n, torch.finfo(work).bits // 8, z.device)
            idx, _ = sup.search(zw, need, rows, xw, sqn, values=False, zsq=zsq)
        out = sparse_krr_core(zw, xw, y, idx, kern, lengthscale, ridge, chunk_size, work, continuous, taper,
                              num_classes)
        return out if out.dtype == z.dtype else out.to(z.dtype)
    return _table_krr(z, zw, sup, y, indices, need, kern, lengthscale, ridge, chunk_size, work, continuous,
                      taper, num_classes)


def _table_krr(z, zw, sup, y, indices, need, kern, lengthscale, ridge, chunk_size, work, continuous, taper,
               num_classes) -> Tensor:
    """``support_krr_core`` with the support's stored table (see there)."""
    m, n = z.shape[0], sup.n
    ls, lam = _scalar(lengthscale, work), _scalar(ridge, work)
    labels = num_classes is not None
    c = num_classes if labels else y.shape[1]
    if m == 0:
        return z.new_zeros(0, c)
    x64, sq64 = sup.tensors(torch.float64)
    plain = zw.detach().to(torch.float64)                                        # (M, d), no graph
    if indices is None:
        idx, d2 = sup.search(plain, need, search_rows(m, n, 8, z.device), x64, sq64)
    else:
        idx = indices
        diff = _gather(x64, idx) - plain.unsqueeze(1)
        d2 = (diff * diff).sum(-1)
    d2z = d2.to(work)
    if _needs_graph(zw):
        d2z = apply(_SelectedSqDists, zw, sup.tensors(work)[0], idx, d2z)
    table = sup.table(kern, work)
    graph = _needs_graph(zw, None if labels else y, ls, lam)
    rows = _rows(m, need, 0, c, labels, work, z.device, chunk_size, graph)
    eye = _eye(need, work, z.device)

    def run(start: int, robust: bool):
        one = rows >= m
        ic = idx if one else idx[start:start + rows]
        dz = d2z if one else d2z[start:start + rows]

        def sq_norms():   # read by kernels of the dot product only
            zs = zw if one else zw[start:start + rows]
            return (zs * zs).sum(1, keepdim=True), _gather(sq64, ic).to(work)

        at = (ic.unsqueeze(2) * n + ic.unsqueeze(1)).view(-1)
        sub = table.view(-1).index_select(0, at).view(*ic.shape, -1)         # (B, k, k) sub-blocks
        kzx = kern.from_sq_dists(dz, ls, sq_norms)
        yg = _gather_targets(y, ic, labels, work)
        return local_solve(kzx, kern.k(sub, ls), dz, yg, eye, lam, continuous, taper, num_classes, robust)

    out = run_chunks(run, m, rows, z.device, graph)
    return out if out.dtype == z.dtype else out.to(z.dtype)


def _fits_one_block(z: Tensor, x, need: int, n: int, continuous: bool, chunk_size, solve_dtype, lengthscale, ridge,
                    y: Tensor, labels: bool) -> bool:
    """Whether a ``sparse_krr`` call is the commonest small call, which ``_one_block_krr`` runs: on the CPU,
    no graph but the queries' (a fixed support, targets and hyperparameters) and no ``torch.func``
    transform, the hard variant with k < N, the torch search, z in the support's dtype (float32 or float64,
    no ``solve_dtype`` of another), and a single search block and a single chunk of local solves."""
    dtype = z.dtype
    if (continuous or need >= n or isinstance(lengthscale, Tensor) or isinstance(ridge, Tensor)  # tensors left:
            or x.dtype != dtype or (solve_dtype is not None and solve_dtype != dtype)      # they need a gradient
            or dtype not in (torch.float32, torch.float64) or z.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and ((isinstance(x, Tensor) and x.requires_grad) or (not labels and y.requires_grad)):
        return False
    m = z.shape[0]
    if m == 0 or functorch_active():
        return False
    c = 1 if labels else y.shape[1]
    return (search_rows(m, n, 8 if dtype == torch.float64 else 4, z.device) >= m
            and _rows(m, need, z.shape[1], c, labels, dtype, z.device, chunk_size, False) >= m)


def _one_block_krr(z: Tensor, x: Tensor, support: PrecomputedSupport | None, norms, y: Tensor, need: int,
                   kern: type[Kernel], lengthscale, ridge, num_classes: int | None) -> Tensor | None:
    """``sparse_krr`` for a call that ``_fits_one_block``, in one pass: the search's one score block from the
    squared norms the checks summed (``norms``), its keyed selection, and the local solves of one chunk,
    by the same functions and in the same order as the general path (``search_indices`` or
    ``PrecomputedSupport.search``, then ``sparse_krr_core``), so the numbers are the same, and with queries
    that need a gradient the same graph (the search sees them detached, as there); what it skips is
    their layers of dispatch (measured on the project's CPU: 3-4 % of a 64-query call of 256 points, 9 % of
    a one-query call). None where the general path has to decide (ties that the keys cannot order, a
    failed factorisation): the caller then runs it (a graph recorded here is dropped)."""
    zs = z.detach() if z.requires_grad else z
    if support is None:
        (zsq, xsq), xt = norms, x.t()
    else:
        x, xsq = support.tensors(z.dtype)
        zsq, xt = norms[0], support.transposed(x)
    ordered = k_smallest_ordered(_distance_block(zs, zsq, 0, z.shape[0], xt, xsq), need)
    if ordered is None:
        return None
    idx, labels = ordered[1], num_classes is not None
    kzx, kxx, d2z = kern.local(z, _gather(x, idx), float(lengthscale))
    yg = _gather_targets(y, idx, labels, z.dtype)
    out, failed = local_solve(kzx, kxx, d2z, yg, _eye(need, z.dtype, z.device), float(ridge), False, 0.5,
                              num_classes, False)
    return None if bool(failed) else out


def _refuse_vmap() -> None:
    if functorch_active() and any(i.key() == torch._C._functorch.TransformType.Vmap
                                  for i in torch._C._functorch.get_interpreter_stack()):
        raise NotImplementedError("sk does not support torch.func.vmap: the neighbour search is data-dependent. "
                                  "SK is batched over the rows of z already: pass the batch as rows")


def sparse_krr(z: Tensor, x: Tensor, y: Tensor, k: int = 32, kernel: str | Kernel = "gaussian",
               lengthscale: float | Tensor | str | None = None, ridge: float | Tensor = 1e-3,
               chunk_size: int | None = None, backend: str = "torch", solve_dtype: torch.dtype | None = None,
               indices: Tensor | None = None, continuous: bool = False, taper: float = 0.5,
               num_classes: int | None = None) -> Tensor:
    """Sparse Kernel prediction: a k x k kernel ridge regression around each evaluation point.

    Args:
        z: (M, d) evaluation points. x: (N, d) support representations (z and x may differ in floating
            dtype; they meet in the wider one), or a ``sk.PrecomputedSupport`` of them (a fixed support
            prepared once for many calls: the same result, cheaper per call; see ``sk.support``).
        y: (N, c) or (N,) float targets, or (N,) integer class labels with ``num_classes`` (the label
            path: scores as with one-hot targets, without forming them; see the module doc).
        k: neighbours per point, any integer type (k >= N uses all N: exact KRR).
        kernel: a name in ``sk.KERNELS`` (gaussian, laplacian, matern32, matern52, imq, linear), a
            ``sk.Kernel`` subclass (a ``sk.DotProductKernel`` for a kernel of a.b), or a ``sk.Kernel``
            instance, whose own lengthscale is used (and gets its gradient when learnable); with an
            instance, leave ``lengthscale`` unset.
        lengthscale: float or 0-dim tensor > 0 (gets its gradient if it requires grad), ``"auto"``
            (``sk.auto_lengthscale(x, min(k, N))``), or None: 1.0, or the kernel instance's.
        ridge: lambda >= 0, float or 0-dim tensor.
        chunk_size: evaluation points per chunk of the local solves (default: the device's local budget,
            ``sk.budget``); the search sizes its own chunks from (M, N) and the search budget.
        backend: neighbour search, ``"torch"`` | ``"faiss"`` | ``"faiss-ivf"`` (see ``sk.knn_search``).
        solve_dtype: e.g. ``torch.float64`` to form and solve the local systems in float64 when the inputs
            are float32 (the result is cast back). Default: the inputs' dtype, float32 for half precision.
        indices: precomputed neighbour indices (M, k') sorted by distance, k' >= k (k + 1 with
            ``continuous``); the first k are used, so one search serves a sweep over k, kernel,
            lengthscale and ridge.
        continuous: weights that vanish at the (k+1)-th neighbour make f continuous in z (module doc).
        taper: width of the weight fall-off for ``continuous``, in (0, 1].
        num_classes: C, with integer labels ``y``.

    Returns:
        (M, c), (M, C) for labels, or (M,) for one-dimensional float y; z's dtype and device.
    """
    k, chunk_size, num_classes = as_k(k), as_chunk_size(chunk_size), as_num_classes(num_classes)
    support = x if isinstance(x, PrecomputedSupport) else None
    if support is not None:
        support.check_current()
        if backend != "torch":
            raise ValueError(f"backend={backend!r}: a PrecomputedSupport searches by its own exact brute force; "
                             "pass the tensor for another backend")
        x = support.x
    labels = check_shapes(z, x, y, num_classes)
    kern, lengthscale = resolve_kernel(kernel, lengthscale)
    check_hyperparameter("ridge", ridge)
    check_taper(taper, continuous)
    _refuse_vmap()
    n = x.shape[0]
    k_eff = min(k, n)
    continuous = continuous and k < n  # with k >= N the neighbour set never changes
    need = k_eff + 1 if continuous else k_eff
    if indices is not None:
        indices = check_indices(indices, z.shape[0], need)
    with declared_precision(z.device):
        # The squared norms the search needs, computed first: their sums are the finite checks of z and x.
        norms = None
        if indices is None and support is None and backend == "torch":
            norms = search_norms(z, x)
        elif indices is None and support is not None and support.searches_plain:
            norms = (support.query_norms(z, solve_dtype), None)
        read = device_checks(z, x, y, lengthscale, ridge, labels=labels, num_classes=num_classes, indices=indices,
                             check_x=support is None, norms=norms)
        if isinstance(lengthscale, str):
            lengthscale = support.auto_lengthscale(k_eff) if support is not None else auto_lengthscale(x, k=k_eff)
        # Hyperparameters that need no gradient and whose values the checks read: numbers from here on.
        if "lengthscale" in read and not (lengthscale.requires_grad and torch.is_grad_enabled()):
            lengthscale = read["lengthscale"]
        if "ridge" in read and not (ridge.requires_grad and torch.is_grad_enabled()):
            ridge = read["ridge"]
        y2 = y.long() if labels else y if y.dim() == 2 else y.unsqueeze(1)
        out = None
        if norms is not None and _fits_one_block(z, x if support is None else support, need, n, continuous,
                                                 chunk_size, solve_dtype, lengthscale, ridge, y2, labels):
            out = _one_block_krr(z, x, support, norms, y2, need, kern, lengthscale, ridge,
                                 num_classes if labels else None)
        if out is not None:
            return out.squeeze(1) if y.dim() == 1 and not labels else out
        idx = None if indices is None else indices.to(device=z.device, dtype=torch.long)
        options = (chunk_size, solve_dtype, continuous, taper, num_classes if labels else None)
        if support is not None:
            out = support_krr_core(z, support, y2, idx, need, kern, lengthscale, ridge, *options,
                                   zsq=None if norms is None else norms[0])
        else:
            if idx is None:
                idx = search_indices(z, x, need, backend, norms)
            out = sparse_krr_core(z, x, y2, idx, kern, lengthscale, ridge, *options)
    return out.squeeze(1) if y.dim() == 1 and not labels else out


def _cross_block(zc: Tensor, xw: Tensor, alpha: Tensor, kern: type[Kernel], ls) -> Tensor:
    return kern.gram(zc, xw, ls) @ alpha


def exact_krr(z: Tensor, x: Tensor, y: Tensor, kernel: str | Kernel = "gaussian",
              lengthscale: float | Tensor | str | None = None, ridge: float | Tensor = 1e-3,
              chunk_size: int | None = None, solve_dtype: torch.dtype | None = None,
              num_classes: int | None = None) -> Tensor:
    """Exact kernel ridge regression f(Z) = K(Z, X) (K(X, X) + lambda I)^{-1} Y (Cholesky, jitter if singular).

    Holds the N x N system; the evaluation points are processed in chunks of ``chunk_size`` rows so no
    M x N matrix is held whole, with no host synchronisation per chunk. With a graph, each (chunk, N)
    kernel block is recomputed in the backward instead of being kept (``torch.utils.checkpoint``; under a
    ``torch.func`` transform, which checkpointing does not support, the blocks are kept).
    ``lengthscale="auto"`` uses ``sk.auto_lengthscale(x, k=N)``: exact KRR is SK with k = N, so that
    ``sparse_krr(..., k >= N, lengthscale="auto")`` equals it. Kernels, shapes, dtypes, integer labels
    (here one-hot encoded: the N x C solve needs them) and autocast as in :func:`sparse_krr`.
    """
    chunk_size, num_classes = as_chunk_size(chunk_size), as_num_classes(num_classes)
    labels = check_shapes(z, x, y, num_classes)
    kern, lengthscale = resolve_kernel(kernel, lengthscale)
    check_hyperparameter("ridge", ridge)
    _refuse_vmap()
    n = x.shape[0]
    with declared_precision(z.device):
        device_checks(z, x, y, lengthscale, ridge, labels=labels, num_classes=num_classes)
        if isinstance(lengthscale, str):
            lengthscale = auto_lengthscale(x, k=n)
        work = work_dtype(z.dtype, x.dtype, solve_dtype=solve_dtype)
        ls, lam = _scalar(lengthscale, work), _scalar(ridge, work)
        if labels:
            y2 = torch.nn.functional.one_hot(y.long(), num_classes).to(work)
        else:
            y2 = (y.unsqueeze(1) if y.dim() == 1 else y).to(work)
        xw = x.to(work)
        system = kern.gram(xw, xw, ls, same=True) + lam * torch.eye(n, dtype=work, device=x.device)
        alpha = solve_spd(system, y2, robust_cholesky(system.detach()))                 # (N, c)
        chunk = chunk_size or default_chunk_size(z.shape[0], n, device=z.device)
        keep = not _needs_graph(z, xw, alpha, ls) or functorch_active()
        out = [_cross_block(z[s:s + chunk].to(work), xw, alpha, kern, ls) if keep else
               checkpoint(_cross_block, z[s:s + chunk].to(work), xw, alpha, kern, ls, use_reentrant=False)
               for s in range(0, z.shape[0], chunk)]
        res = torch.cat(out).to(z.dtype) if out else z.new_zeros(0, y2.shape[1])
    return res.squeeze(1) if y.dim() == 1 and not labels else res
