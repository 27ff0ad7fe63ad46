r"""Sparse Kernel (local kernel ridge regression) and exact kernel ridge regression, functional API.

Sparse Kernel (SK): for each evaluation point z_m with I_m its k nearest support points,

.. math::
    \alpha_m = (K(X_{I_m}, X_{I_m}) + \lambda I_k)^{-1} Y_{I_m}, \qquad f(z_m) = K(z_m, X_{I_m})\, \alpha_m .

Exact KRR: :math:`f(Z) = K(Z, X) (K(X, X) + \lambda I_N)^{-1} Y`. With k >= N the two agree.

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
memory budget (``sk.budget``; ``chunk_size`` overrides it). Per chunk, the neighbours are gathered and
centred (one subtraction on the gathered block, no copy of the support), all distances come from one
batched matmul, and each system is factorised once by ``cholesky_ex``. The centre is the query
(``Kernel.local_offsets``), except when only the query needs a gradient (a fixed support, learned
queries): then it is the nearest neighbour (``Kernel.local_anchored``), so that the (B, k, k) matmul
does not involve the query and carries no graph; the query enters through one (B, k) product, and the
backward no longer repeats the batched matmul twice (measured: 64 queries against 256 points, d = 256,
k = 16, forward and backward to the queries in 1.7 ms instead of 2.6 ms). A failed factorisation (a singular or indefinite system) is not looked at inside the
loop: every chunk records on the device whether it had one, and after the loop one host
synchronisation finds such chunks, which are recomputed with jitter escalation (``sk.robust_cholesky``);
their first results are discarded, graph included. Input validation that needs the device (finite
values, label and index ranges, tensor hyperparameters) is one fused check, one synchronisation per
call; on the CPU its values are read as Python numbers, and hyperparameters that need no gradient are
used as numbers from then on (a small call is a few dozen tensor operations, each of which costs
microseconds: one fewer matters). A call whose points fit one chunk skips the chunk machinery. A fixed
support queried many times can be prepared once (``sk.PrecomputedSupport``, ``sk.support``). Without any tensor that needs a gradient, the gathered neighbours go to one buffer reused by
every chunk (fresh blocks cost page faults on the CPU); with one, every chunk gets fresh memory, since
autograd keeps it. On a CPU with several torch threads the chunks run in parallel, one per thread
(``map_chunks``): a chunk is thousands of tiny factorisations that no single op parallelises well.

Precision: float16 / bfloat16 inputs are searched in float32 and solved in float32 (or
``solve_dtype``), and the result has z's dtype; autocast is switched off inside (``sk.precision``).
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .budget import local_rows, search_rows
from .kernels import Kernel, kernel_class
from .knn import as_chunk_size, as_k, auto_lengthscale, default_chunk_size, knn_search
from .linalg import robust_cholesky, serial_lapack
from .precision import HALF, no_autocast, work_dtype
from .support import PrecomputedSupport

__all__ = ["sparse_krr", "exact_krr", "continuity_weights"]


# -- validation ---------------------------------------------------------------------------------------
def _check_tensor(name: str, t: Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")


def _is_labels(y: Tensor) -> bool:
    return not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool


def as_num_classes(num_classes) -> int | None:
    """None, or C as a Python int >= 1 (any integer type); ValueError otherwise."""
    if num_classes is None:
        return None
    try:
        value = as_k(num_classes)
    except ValueError:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}") from None
    return value


def check_shapes(z: Tensor, x: Tensor, y: Tensor | None, num_classes: int | None = None) -> bool:
    """Shape, dtype and device checks that need no synchronisation; True when y holds class labels.
    ``num_classes`` must already be a Python int (``as_num_classes``)."""
    _check_tensor("z", z, (2,))
    _check_tensor("x", x, (2,))
    for name, t in (("z", z), ("x", x)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.shape[0] == 0:
        raise ValueError("empty support set: x has no rows")
    if z.shape[1] != x.shape[1]:
        raise ValueError(f"feature size mismatch: z has d={z.shape[1]} but x has d={x.shape[1]}")
    labels = False
    if y is not None:
        _check_tensor("y", y, (1, 2))
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"row mismatch: y has {y.shape[0]} rows but x has {x.shape[0]}")
        labels = _is_labels(y)
        if labels:
            if num_classes is None:
                raise ValueError(f"y is an integer tensor ({y.dtype}): class labels need num_classes=C "
                                 "(or pass one-hot / regression targets as floats)")
            if y.dim() != 1:
                raise ValueError(f"integer labels must be one-dimensional (N,), got shape {tuple(y.shape)}")
        elif not y.is_floating_point():
            raise ValueError(f"y must be floating-point targets or integer labels, got {y.dtype}")
        elif num_classes is not None and (y.dim() != 2 or y.shape[1] != num_classes):
            raise ValueError(f"num_classes={num_classes} is for integer labels; float targets of shape "
                             f"{tuple(y.shape)} do not have {num_classes} columns")
    if z.device != x.device or (y is not None and y.device != x.device):
        raise ValueError("z, x and y must be on the same device")
    return labels


def check_inputs(z: Tensor, x: Tensor, y: Tensor | None, k: int | None = None,
                 num_classes: int | None = None) -> None:
    """Raise ValueError naming the problem for inputs that the contract rejects (all checks, one
    synchronisation)."""
    if k is not None:
        as_k(k)
    num_classes = as_num_classes(num_classes)
    labels = check_shapes(z, x, y, num_classes)
    device_checks(z, x, y, labels=labels, num_classes=num_classes)


def _sum(t: Tensor) -> Tensor:
    return t.sum(dtype=torch.float32) if t.dtype in HALF else t.sum()


def device_checks(z: Tensor, x: Tensor, y: Tensor | None, lengthscale=None, ridge=None, labels: bool = False,
                  num_classes: int | None = None, indices: Tensor | None = None, check_x: bool = True) -> dict:
    """The checks that read the tensors' values, fused into one host read (one synchronisation).

    One summation per tensor detects NaN or inf (they propagate; tensor hyperparameters are added to the
    same sum); only a failed check pays for the elementwise checks that name the culprit (a finite
    tensor whose sum overflows passes them). ``check_x=False`` skips x (a precomputed support was
    checked when it was prepared). On the CPU the sums, tensor hyperparameters and index ranges are read
    as Python numbers in that one read (a read costs no synchronisation there, and checks in Python save
    tensor operations in small calls); the values of the tensor hyperparameters are returned,
    ``{"lengthscale": float, "ridge": float}``, for callers that then compute with numbers. On other
    devices the checks are one fused boolean and nothing is returned.
    """
    lab = y if labels else None
    if z.device.type == "cpu":
        ok, read = _cpu_checks(z, x if check_x else None, None if labels else y, lengthscale, ridge, lab,
                               num_classes, indices, x.shape[0])
    else:
        ok, read = _device_checks_pass(z, x if check_x else None, None if labels else y, lengthscale, ridge, lab,
                                       num_classes, indices, x.shape[0]), {}
    if ok:
        return read
    for name, t in (("z", z), ("x", x if check_x else None), ("y", None if labels else y)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if isinstance(lengthscale, Tensor):
        check_lengthscale(lengthscale)
    if isinstance(ridge, Tensor):
        check_ridge(ridge)
    if labels and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels out of range [0, {num_classes}) for num_classes={num_classes}")
    if indices is not None and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= x.shape[0]):
        raise ValueError(f"indices out of range [0, {x.shape[0]})")
    raise ValueError("inputs failed a value check (a sum over finite values overflowed?)")  # pragma: no cover


@torch.no_grad()
def _cpu_checks(z, x, y, lengthscale, ridge, labels, num_classes, indices, n) -> tuple[bool, dict]:
    parts = [_sum(t) for t in (z, x, y) if t is not None]
    sums = len(parts)
    hyper = [(name, v) for name, v in (("lengthscale", lengthscale), ("ridge", ridge)) if isinstance(v, Tensor)]
    parts += [v if v.dim() == 0 else v.reshape(()) for _, v in hyper]
    ranges = [(t, hi) for t, hi in ((labels, num_classes), (indices, n)) if t is not None and t.numel()]
    for t, _ in ranges:
        parts += [m.double() for m in torch.aminmax(t)]
    values = torch.stack(parts).tolist() if len(parts) > 1 else [float(parts[0])]   # the one read
    read = {name: values[sums + j] for j, (name, _) in enumerate(hyper)}
    ok = math.isfinite(sum(values[:sums + len(hyper)]))
    ok = ok and read.get("lengthscale", 1.0) > 0 and read.get("ridge", 0.0) >= 0
    at = sums + len(hyper)
    for j, (_, hi) in enumerate(ranges):
        ok = ok and values[at + 2 * j] >= 0 and values[at + 2 * j + 1] < hi
    return ok, read


def _device_checks_pass(z, x, y, lengthscale, ridge, labels, num_classes, indices, n) -> bool:
    total = _sum(z.detach()) if x is None else _sum(z.detach()) + _sum(x.detach())
    if y is not None:
        total = total + _sum(y.detach())
    ls = lengthscale.detach() if isinstance(lengthscale, Tensor) else None
    lam = ridge.detach() if isinstance(ridge, Tensor) else None
    for v in (ls, lam):
        if v is not None:
            total = total + v.reshape(())
    ok = (total - total) == 0                 # False for NaN and +-inf
    if ls is not None:
        ok = ok & (ls.reshape(()) > 0)
    if lam is not None:
        ok = ok & (lam.reshape(()) >= 0)
    if labels is not None and labels.numel():
        lo, hi = torch.aminmax(labels)
        ok = ok & (lo >= 0) & (hi < num_classes)
    if indices is not None and indices.numel():
        lo, hi = torch.aminmax(indices)
        ok = ok & (lo >= 0) & (hi < n)
    return bool(ok)                 # the one synchronisation


def check_lengthscale(lengthscale) -> None:
    """A finite lengthscale > 0 (float or one-element tensor); ValueError otherwise."""
    if isinstance(lengthscale, Tensor):
        ok = lengthscale.numel() == 1 and math.isfinite(value := float(lengthscale.detach())) and value > 0
    else:
        try:
            value = float(lengthscale)
        except (TypeError, ValueError):
            value = float("nan")
        ok = math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"lengthscale must be finite and positive, got {lengthscale!r}")


def check_ridge(ridge) -> None:
    """A finite ridge >= 0 (float or one-element tensor); ValueError otherwise."""
    if isinstance(ridge, Tensor):
        if ridge.numel() != 1:
            raise ValueError(f"ridge must be a scalar, got shape {tuple(ridge.shape)}")
        value = float(ridge.detach())
    else:
        try:
            value = float(ridge)
        except (TypeError, ValueError):
            raise ValueError(f"ridge must be a finite scalar, got {ridge!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"ridge must be a finite scalar, got {ridge!r}")
    if value < 0:
        raise ValueError(f"negative ridge {value:g}: the ridge must be >= 0")


def _check_scalar_python(name: str, value, positive: bool) -> None:
    """Python-side check of a hyperparameter: floats now, tensors only for their shape (their values
    go to the fused device check)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return
    if name == "lengthscale":
        check_lengthscale(value)
    else:
        check_ridge(value)


def resolve_kernel(kernel, lengthscale) -> tuple[type[Kernel], float | Tensor | str]:
    """The kernel class and the lengthscale to use.

    ``kernel`` is a name, a ``sk.Kernel`` subclass or a ``sk.Kernel`` instance. An instance brings its
    own lengthscale (a tensor; its gradient reaches the instance's ``log_lengthscale``), so passing a
    ``lengthscale`` as well is ambiguous and raises. With a name or a class, ``lengthscale=None``
    means 1.0.
    """
    if isinstance(kernel, Kernel):
        if lengthscale is not None:
            raise ValueError(f"kernel={type(kernel).__name__}(...) instance carries its own lengthscale "
                             f"({float(kernel.lengthscale.detach()):.4g}); pass lengthscale= only with a kernel "
                             "name, or set it on the instance")
        return type(kernel), kernel.lengthscale
    if isinstance(kernel, type) and issubclass(kernel, Kernel):
        kern = kernel
    else:
        kern = kernel_class(kernel)
    if lengthscale is None:
        return kern, 1.0
    if isinstance(lengthscale, str):
        if lengthscale != "auto":
            raise ValueError(f"lengthscale must be a positive number, a 0-dim tensor or 'auto', got {lengthscale!r}")
        return kern, lengthscale
    _check_scalar_python("lengthscale", lengthscale, True)
    return kern, lengthscale


def resolve_lengthscale(lengthscale, x: Tensor, k: int) -> float | Tensor:
    """A float or 0-dim tensor > 0; ``"auto"`` gives ``auto_lengthscale(x, k)``."""
    if isinstance(lengthscale, str):
        if lengthscale != "auto":
            raise ValueError(f"lengthscale must be a positive number, a 0-dim tensor or 'auto', got {lengthscale!r}")
        return auto_lengthscale(x, k=k)
    check_lengthscale(lengthscale)
    return lengthscale


def check_indices(indices: Tensor, m: int, need: int) -> Tensor:
    """Shape and dtype of precomputed neighbour indices (their range goes to the fused device check)."""
    if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.shape[0] != m:
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a tensor of shape (M={m}, k'), got {shape}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.shape[1] < need:
        raise ValueError(f"indices has {indices.shape[1]} columns but {need} neighbours are needed (k' >= k)")
    return indices[:, :need]


def _cast(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, Tensor) else value


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


def _local_chunk(zc: Tensor, xg: Tensor, yg: Tensor, kern: type[Kernel], lengthscale, eye: Tensor, ridge,
                 continuous: bool, taper: float, num_classes: int | None, robust: bool):
    """Outputs (B, c) for one chunk, and (unless ``robust``) a 0-dim device flag: did a factorisation fail.

    zc (B, d), xg (B, k, d) gathered neighbours in the work dtype, nearest first (modified in place: the
    caller owns it), yg (B, k, c) gathered targets or (B, k) gathered labels; ``eye`` (k, k) and the
    ridge (a float or a 0-dim tensor).

    Stationary kernels see differences only, so the neighbours are centred before their distances are
    formed (rounding relative to the neighbourhood, not to ||x||; see ``Kernel.local_offsets``):

    - on their query when nothing needs a gradient (in place), or when the support does (its gradient
      flows through the k x k Gram anyway);
    - on their nearest neighbour when only the query needs one (a fixed support, learned queries): the
      (B, k, k) Gram then depends on the support alone and carries no graph, and the query enters through
      one (B, k) product (``Kernel.local_anchored``). Centred on the query, the Gram's backward was two
      (B, k, k, d) batched matmuls per chunk.
    """
    if not kern.stationary:
        kzx, kxx, d2z = kern.local(zc, xg, lengthscale)
    elif xg.requires_grad:
        # Out of place (xg is a view: in place would make autograd copy the block), and as xg + (-z), whose
        # backward sums the (B, k, d) gradient before negating it.
        kzx, kxx, d2z = kern.local_offsets(xg + zc.neg().unsqueeze(1), lengthscale)
    elif zc.requires_grad and torch.is_grad_enabled():
        kzx, kxx, d2z = kern.local_anchored(zc, xg, lengthscale)
    else:
        kzx, kxx, d2z = kern.local_offsets(xg.sub_(zc.unsqueeze(1)), lengthscale)
    return local_solve(kzx, kxx, d2z, yg, eye, ridge, continuous, taper, num_classes, robust)


def local_solve(kzx: Tensor, kxx: Tensor, d2z: Tensor | None, yg: Tensor, eye: Tensor, ridge, continuous: bool,
                taper: float, num_classes: int | None, robust: bool):
    """The local solves of one chunk from its kernel values: kzx (B, k), kxx (B, k, k), the squared query
    distances d2z (B, k) (read by the continuous variant only), yg (B, k, c) targets or (B, k) labels,
    ``eye`` (k, k) and the ridge (a float, or a 0-dim tensor that may carry a gradient).
    Returns the outputs (B, c) and (unless ``robust``) a 0-dim device flag: did a factorisation fail."""
    if continuous:
        omega = continuity_weights(d2z, taper)
        kxx = omega.unsqueeze(2) * kxx * omega.unsqueeze(1)
        kzx = kzx * omega
    if isinstance(ridge, Tensor):
        system = kxx + ridge * eye
    elif kxx.requires_grad:
        system = torch.add(kxx, eye, alpha=ridge)
    else:  # kxx is this chunk's own block, outside any graph
        system = kxx.add_(eye, alpha=ridge)
    with serial_lapack(system):
        if robust:
            chol, failed = robust_cholesky(system), None
        else:
            chol, info = torch.linalg.cholesky_ex(system)
            failed = info.any()
        if num_classes is not None:
            # beta = (K + lambda I)^{-1} k_z = L^{-T} (L^{-1} k_z), then f_c = sum of beta over the neighbours
            # labelled c. Two triangular solves: measured faster than cholesky_solve on the CPU.
            w = torch.linalg.solve_triangular(chol, kzx.unsqueeze(2), upper=False)
            beta = torch.linalg.solve_triangular(chol.mT, w, upper=True).squeeze(2)
            if continuous:
                beta = beta * omega
            out = beta.new_zeros(beta.shape[0], num_classes).scatter_add(1, yg, beta)
        else:
            if continuous:
                yg = yg * omega.unsqueeze(2)
            # f = kzx^T (L L^T)^{-1} Y = (L^{-1} kzx)^T (L^{-1} Y): one forward substitution with the k + c
            # right-hand sides [kzx | Y] instead of a forward and a backward one (cholesky_solve).
            w = torch.linalg.solve_triangular(chol, torch.cat([kzx.unsqueeze(2), yg], dim=2), upper=False)
            out = (w[:, :, :1] * w[:, :, 1:]).sum(1)
    return out, failed


def balanced_rows(m: int, rows: int, device: torch.device) -> int:
    """Rows per chunk, at most ``rows``, such that the chunks split evenly over ``map_chunks``' threads
    (13 chunks on 2 threads leave one thread idle for the last; 14 do not)."""
    threads = torch.get_num_threads()
    chunks = -(-m // rows)
    if device.type != "cpu" or threads == 1 or chunks < 2:
        return rows
    chunks = -(-chunks // threads) * threads
    return -(-m // chunks)


def map_chunks(fn, starts, device: torch.device) -> list:
    """``[fn(s) for s in starts]``; on a CPU with several torch threads, chunks run in parallel instead,
    one per thread, each op single-threaded.

    A chunk of local solves is many small operations (a 32 x 32 factorisation is a few microseconds), and
    torch runs a batch of them one matrix at a time on one thread (``serial_lapack``): with one chunk per
    thread all cores work on them, and a busy core slows only its own chunks instead of stalling every
    parallel region. Thread-local state that matters to the chunks (grad mode, inference mode) is passed
    on; the torch thread count (process state) is 1 while they run.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(starts) < 2:
        return [fn(s) for s in starts]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(start):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(start)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            return list(pool.map(task, starts))
    finally:
        torch.set_num_threads(threads)


def _needs_graph(*values) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad for v in values)


def sparse_krr_core(z: Tensor, x: Tensor, y: Tensor, idx: Tensor, kern: type[Kernel], lengthscale, ridge,
                    chunk_size: int | None = None, solve_dtype: torch.dtype | None = None,
                    continuous: bool = False, taper: float = 0.5, num_classes: int | None = None) -> Tensor:
    """SK on validated inputs: neighbour indices idx (M, k), nearest first -> (M, c). No checks here.

    ``y`` is (N, c) float targets, or (N,) integer labels with ``num_classes`` (the label path). Written so
    that a small call (one query, a few hundred support points) stays a few dozen tensor operations:
    hyperparameters that need no gradient become Python numbers on the CPU (``_scalar``), the identity is
    cached, and one chunk runs without the chunk machinery.
    """
    m, d = z.shape
    k = idx.shape[1]
    work = work_dtype(z.dtype, x.dtype, solve_dtype=solve_dtype)
    ls, lam = _scalar(lengthscale, work, z.device), _scalar(ridge, work, z.device)
    labels = num_classes is not None
    c = num_classes if labels else y.shape[1]
    if m == 0:
        return z.new_zeros(0, c)
    esize = torch.finfo(work).bits // 8
    # One point's working set: its neighbours (k, d), a few k x k matrices, its gathered targets (k, c)
    # or labels and beta, and its output row.
    row_bytes = esize * (k * (d + 4 * k + (1 if labels else c)) + c)
    rows = chunk_size or balanced_rows(m, local_rows(m, row_bytes, z.device), z.device)
    eye = _eye(k, work, z.device)
    graph = _needs_graph(z, x, None if labels else y, ls, lam)
    # Without a graph, the gathered neighbours, the one large per-chunk tensor, go to a buffer reused by
    # every chunk (one per worker thread).
    reuse = not graph and x.dtype == work and rows < m
    buffers = threading.local()

    def run(start: int, robust: bool = False):
        ic = idx[start:start + rows] if rows < m else idx
        b = ic.shape[0]
        flat = ic.reshape(-1)
        if reuse:
            buffer = getattr(buffers, "xg", None)
            if buffer is None:
                buffer = buffers.xg = x.new_empty(min(rows, m) * k, d)
            xg = torch.index_select(x, 0, flat, out=buffer[:b * k]).view(b, k, d)
        else:
            xg = x.index_select(0, flat).view(b, k, d)
            if xg.dtype != work:
                xg = xg.to(work)
        yg = y.index_select(0, flat).view(b, k) if labels else y.index_select(0, flat).view(b, k, c)
        if not labels and yg.dtype != work:
            yg = yg.to(work)
        zc = z[start:start + rows] if rows < m else z
        return _local_chunk(zc if zc.dtype == work else zc.to(work), xg, yg, kern, ls, eye, lam, continuous,
                            taper, num_classes, robust)

    if rows >= m:
        out, failed = run(0)
        if bool(failed):            # the loop's one synchronisation
            out, _ = run(0, robust=True)
        return out if out.dtype == z.dtype else out.to(z.dtype)
    starts = range(0, m, rows)
    outs, failed = zip(*map_chunks(run, starts, z.device))
    outs = list(outs)
    if bool(torch.stack(failed).any()):     # the loop's one synchronisation
        for j in [j for j, f in enumerate(failed) if bool(f)]:
            outs[j], _ = run(starts[j], robust=True)
    return torch.cat(outs).to(z.dtype)


_EYES: dict = {}


def _eye(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached identity (k, k): small calls would otherwise spend a few percent of their time making it."""
    key = (k, dtype, device)
    eye = _EYES.get(key)
    if eye is None:
        if len(_EYES) > 64:
            _EYES.clear()
        eye = _EYES[key] = torch.eye(k, dtype=dtype, device=device)
    return eye


def support_krr_core(z: Tensor, sup: PrecomputedSupport, y: Tensor, indices: Tensor | None, need: int,
                     kern: type[Kernel], lengthscale, ridge, chunk_size: int | None = None,
                     solve_dtype: torch.dtype | None = None, continuous: bool = False, taper: float = 0.5,
                     num_classes: int | None = None) -> Tensor:
    """SK against a prepared support (``sk.support``) on validated inputs -> (M, c). No checks here.

    The search is the support's own (``PrecomputedSupport.search``: the scores of ``sk.knn_search``).
    Without stored distances the local solves are the plain path's (``sparse_krr_core``). With them the
    search runs in float64, its scores give the query distances, and each chunk gathers its (B, k, k)
    sub-blocks of the stored distances.
    """
    m = z.shape[0]
    if m == 0:
        return z.new_zeros(0, num_classes if num_classes is not None else y.shape[1])
    work = solve_dtype or sup.dtype
    zw = z if z.dtype == work else z.to(work)
    if not sup.has_distances:
        xw, sqn = sup.tensors(work)
        if indices is None:
            idx, _ = sup.search(zw.detach() if zw.requires_grad else zw, need,
                                search_rows(m, sup.n, torch.finfo(work).bits // 8, z.device), xw, sqn)
        else:
            idx = indices
        out = sparse_krr_core(zw, xw if kern.stationary else sup.x, y, idx, kern, lengthscale, ridge, chunk_size,
                              work, continuous, taper, num_classes)
        return out if out.dtype == z.dtype else out.to(z.dtype)

    n = sup.n
    ls, lam = _scalar(lengthscale, work, z.device), _scalar(ridge, work, z.device)
    labels = num_classes is not None
    c = num_classes if labels else y.shape[1]
    x64, sq64 = sup._x64, sup._sq64
    zc = zw.to(torch.float64)                                 # (M, d) float64, z's graph
    srows = search_rows(m, n, 8, z.device)
    if indices is None:
        idx, part = sup.search(zc, need, srows, x64, sq64)
    else:
        idx = indices
        part = torch.cat([torch.addmm(sq64, zc[s:s + srows], x64.t(), alpha=-2.0).gather(1, idx[s:s + srows])
                          for s in range(0, m, srows)])
    d2z = (part + (zc * zc).sum(1, keepdim=True)).clamp_min(0.0).to(work) if kern.stationary or continuous else None
    if kern.stationary:
        kzx_lin, flat = None, sup.distances(work)
    else:  # z . x_j = (||x_j||^2 - part) / 2
        kzx_lin, flat = ((sq64[idx] - part) * 0.5).to(work), sup.linear_gram(work)
    row_bytes = (torch.finfo(work).bits // 8) * (need * (4 * need + (1 if labels else c)) + c)
    rows = chunk_size or balanced_rows(m, local_rows(m, row_bytes, z.device), z.device)
    eye = _eye(need, work, z.device)

    def run(start: int, robust: bool = False):
        one = rows >= m
        ic = idx if one else idx[start:start + rows]
        sub = flat.take(ic.unsqueeze(2) * n + ic.unsqueeze(1))               # (B, k, k) sub-blocks
        dz = None if d2z is None else (d2z if one else d2z[start:start + rows])
        if kzx_lin is None:
            kzx, kxx = kern.k(dz, ls), kern.k(sub, ls)
        else:
            kzx, kxx = (kzx_lin if one else kzx_lin[start:start + rows]), sub
        yg = y[ic] if labels or y.dtype == work else y[ic].to(work)          # (B, k) labels or (B, k, c)
        return local_solve(kzx, kxx, dz, yg, eye, lam, continuous, taper, num_classes, robust)

    if rows >= m:
        out, failed = run(0)
        if bool(failed):            # the local solves' one synchronisation
            out, _ = run(0, robust=True)
        return out if out.dtype == z.dtype else out.to(z.dtype)
    starts = range(0, m, rows)
    outs, failed = zip(*map_chunks(run, starts, z.device))
    outs = list(outs)
    if bool(torch.stack(failed).any()):
        for j in [j for j, f in enumerate(failed) if bool(f)]:
            outs[j], _ = run(starts[j], robust=True)
    return torch.cat(outs).to(z.dtype)


def _scalar(value, dtype: torch.dtype, device: torch.device):
    """A hyperparameter for the arithmetic: a tensor in ``dtype``, or a Python float (``sparse_krr`` turns
    CPU tensors that need no gradient into floats with the values its checks read: a float saves a tensor
    operation at every use)."""
    return value.to(dtype) if isinstance(value, Tensor) else float(value)


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
            ``sk.Kernel`` subclass, or a ``sk.Kernel`` instance, whose own lengthscale is used (and gets
            its gradient when learnable); with an instance, leave ``lengthscale`` unset.
        lengthscale: float or 0-dim tensor > 0 (gets its gradient if it requires grad), ``"auto"``
            (``sk.auto_lengthscale(x, k)``), or None: 1.0, or the kernel instance's.
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
    k = as_k(k)
    chunk_size = as_chunk_size(chunk_size)
    num_classes = as_num_classes(num_classes)
    support = x if isinstance(x, PrecomputedSupport) else None
    if support is not None:
        support.check_current()
        if backend != "torch":
            raise ValueError(f"backend={backend!r}: a PrecomputedSupport searches by its own exact brute force; "
                             "pass the tensor for another backend")
        x = support.x
    labels = check_shapes(z, x, y, num_classes)
    kern, lengthscale = resolve_kernel(kernel, lengthscale)
    _check_scalar_python("ridge", ridge, False)
    if continuous and not 0.0 < taper <= 1.0:
        raise ValueError(f"taper must be in (0, 1], got {taper}")
    n = x.shape[0]
    k_eff = min(k, n)
    continuous = continuous and k < n  # with k >= N the neighbour set never changes
    need = k_eff + 1 if continuous else k_eff
    if indices is not None:
        indices = check_indices(indices, z.shape[0], need)
    with no_autocast(z.device):
        read = device_checks(z, x, y, lengthscale, ridge, labels=labels, num_classes=num_classes, indices=indices,
                             check_x=support is None)
        if isinstance(lengthscale, str):
            lengthscale = auto_lengthscale(x, k=k_eff)
        # Hyperparameters that need no gradient and whose values the checks read: numbers from here on.
        if "lengthscale" in read and not (lengthscale.requires_grad and torch.is_grad_enabled()):
            lengthscale = read["lengthscale"]
        if "ridge" in read and not (ridge.requires_grad and torch.is_grad_enabled()):
            ridge = read["ridge"]
        y2 = y.long() if labels else y if y.dim() == 2 else y.unsqueeze(1)
        if support is not None:
            idx = None if indices is None else indices.to(device=z.device, dtype=torch.long)
            out = support_krr_core(z, support, y2, idx, need, kern, lengthscale, ridge, chunk_size, solve_dtype,
                                   continuous, taper, num_classes if labels else None)
            return out.squeeze(1) if y.dim() == 1 and not labels else out
        if indices is None:
            _, idx = knn_search(z, x, need, backend=backend)
        else:
            idx = indices.to(device=z.device, dtype=torch.long)
        out = sparse_krr_core(z, x, y2, idx, kern, lengthscale, ridge, chunk_size, solve_dtype, continuous,
                              taper, num_classes if labels else None)
    return out.squeeze(1) if y.dim() == 1 and not labels else out


def exact_krr(z: Tensor, x: Tensor, y: Tensor, kernel: str | Kernel = "gaussian",
              lengthscale: float | Tensor | str | None = None, ridge: float | Tensor = 1e-3,
              chunk_size: int | None = None, solve_dtype: torch.dtype | None = None,
              num_classes: int | None = None) -> Tensor:
    """Exact kernel ridge regression f(Z) = K(Z, X) (K(X, X) + lambda I)^{-1} Y (Cholesky, jitter if singular).

    Holds the N x N system; the evaluation points are processed in chunks of ``chunk_size`` rows so no
    M x N matrix is held whole. ``lengthscale="auto"`` uses ``sk.auto_lengthscale(x)``. Kernels,
    shapes, dtypes, integer labels (here one-hot encoded: the N x C solve needs them) and autocast as in
    :func:`sparse_krr`.
    """
    chunk_size = as_chunk_size(chunk_size)
    num_classes = as_num_classes(num_classes)
    labels = check_shapes(z, x, y, num_classes)
    kern, lengthscale = resolve_kernel(kernel, lengthscale)
    _check_scalar_python("ridge", ridge, False)
    with no_autocast(z.device):
        device_checks(z, x, y, lengthscale, ridge, labels=labels, num_classes=num_classes)
        if isinstance(lengthscale, str):
            lengthscale = auto_lengthscale(x, k=32)
        work = work_dtype(z.dtype, x.dtype, solve_dtype=solve_dtype)
        ls, lam = _cast(lengthscale, work), _cast(ridge, work)
        if labels:
            y2 = torch.nn.functional.one_hot(y.long(), num_classes).to(work)
        else:
            y2 = (y.unsqueeze(1) if y.dim() == 1 else y).to(work)
        xw = x.to(work)
        n = x.shape[0]
        gram = kern.gram(xw, xw, ls, same=True)
        factor = robust_cholesky(gram + lam * torch.eye(n, dtype=work, device=x.device))
        with serial_lapack(factor):
            alpha = torch.cholesky_solve(y2, factor)                                 # (N, c)
        chunk = chunk_size or default_chunk_size(z.shape[0], n, device=z.device)
        out = [kern.gram(z[s:s + chunk].to(work), xw, ls) @ alpha for s in range(0, z.shape[0], chunk)]
        res = torch.cat(out).to(z.dtype) if out else z.new_zeros(0, y2.shape[1])
    return res.squeeze(1) if y.dim() == 1 and not labels else res
