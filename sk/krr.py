r"""Sparse Kernel (local kernel ridge regression) and exact kernel ridge regression, functional API.

Sparse Kernel (SK): for each evaluation point z_m with I_m its k nearest support points,

.. math::
    \alpha_m = (K(X_{I_m}, X_{I_m}) + \lambda I_k)^{-1} Y_{I_m}, \qquad f(z_m) = K(z_m, X_{I_m})\, \alpha_m .

Exact KRR: :math:`f(Z) = K(Z, X) (K(X, X) + \lambda I_N)^{-1} Y`. With k >= N the two agree.

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
weights fall from 1 to 0. Use the hard variant for plain readouts and classification (it is the
contract's SK and equals KRR for k >= N); use the continuous one when f is optimised through z (a
policy or a learned input, a test-time optimiser, an ODE) or when jumps would hurt a smoothness
argument. It costs one more neighbour per system.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import Kernel, kernel_class
from .knn import auto_lengthscale, default_chunk_size, knn_search
from .linalg import psd_solve, robust_cholesky, serial_lapack

__all__ = ["sparse_krr", "exact_krr", "continuity_weights"]

# Elements of the per-chunk local tensors (B, k, d + k + c): 2^22 floats = 16 MiB in float32. Blocks
# under glibc's 32 MiB mmap limit are recycled by malloc; larger ones are mapped afresh for every chunk
# and their page faults were measured to cost more than the arithmetic (1.4x on the whole local phase).
LOCAL_BLOCK_ELEMENTS = 1 << 22


# -- validation ---------------------------------------------------------------------------------------
def _check_tensor(name: str, t: Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype} (one-hot encode labels)")
    # One summation detects NaN or inf (they propagate); only a suspicious sum (which may also be an
    # overflow of finite values) pays for the elementwise check.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_inputs(z: Tensor, x: Tensor, y: Tensor | None, k: int | None = None) -> None:
    """Raise ValueError naming the problem for inputs that the contract rejects."""
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    _check_tensor("z", z, (2,))
    _check_tensor("x", x, (2,))
    if x.shape[0] == 0:
        raise ValueError("empty support set: x has no rows")
    if z.shape[1] != x.shape[1]:
        raise ValueError(f"feature size mismatch: z has d={z.shape[1]} but x has d={x.shape[1]}")
    if y is not None:
        _check_tensor("y", y, (1, 2))
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"row mismatch: y has {y.shape[0]} rows but x has {x.shape[0]}")
    if z.device != x.device or (y is not None and y.device != x.device):
        raise ValueError("z, x and y must be on the same device")
    if z.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: z is {z.dtype} but x is {x.dtype} (y is cast to z's dtype)")


def resolve_lengthscale(lengthscale, x: Tensor, k: int) -> float | Tensor:
    """A float or 0-dim tensor > 0; ``"auto"`` gives ``auto_lengthscale(x, k)``."""
    if isinstance(lengthscale, str):
        if lengthscale != "auto":
            raise ValueError(f"lengthscale must be a positive number, a 0-dim tensor or 'auto', got {lengthscale!r}")
        return auto_lengthscale(x, k=k)
    value = lengthscale.detach() if isinstance(lengthscale, Tensor) else torch.as_tensor(float(lengthscale))
    if value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value) <= 0:
        raise ValueError(f"lengthscale must be finite and positive, got {lengthscale!r}")
    return lengthscale


def check_ridge(ridge) -> None:
    value = ridge.detach() if isinstance(ridge, Tensor) else torch.as_tensor(float(ridge))
    if value.numel() != 1 or not bool(torch.isfinite(value).all()):
        raise ValueError(f"ridge must be a finite scalar, got {ridge!r}")
    if float(value) < 0:
        raise ValueError(f"negative ridge {float(value):g}: the ridge must be >= 0")


def _resolve_kernel(kernel) -> type[Kernel]:
    if isinstance(kernel, Kernel):
        return type(kernel)
    if isinstance(kernel, type) and issubclass(kernel, Kernel):
        return kernel
    return kernel_class(kernel)


def _cast(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, Tensor) else value


# -- the local solves ---------------------------------------------------------------------------------
def continuity_weights(sq_dist: Tensor, taper: float) -> Tensor:
    """omega (B, k+1) for the k+1 nearest squared distances (B, k+1); 0 at the (k+1)-th (see module doc)."""
    hi = sq_dist.max(1, keepdim=True).values
    lo = sq_dist.min(1, keepdim=True).values
    span = (taper * (hi - lo)).clamp_min(torch.finfo(sq_dist.dtype).tiny)
    t = ((hi - sq_dist) / span).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def local_predict(zc: Tensor, xg: Tensor, yg: Tensor, kern: type[Kernel], lengthscale, ridge,
                  continuous: bool = False, taper: float = 0.5) -> Tensor:
    """f for one chunk: zc (B, d), gathered neighbours xg (B, k, d) and targets yg (B, k, c) -> (B, c)."""
    kzx, kxx, d2z = kern.local(zc, xg, lengthscale)
    if continuous:
        omega = continuity_weights(d2z, taper)
        kxx = omega.unsqueeze(2) * kxx * omega.unsqueeze(1)
        kzx = kzx * omega
        yg = yg * omega.unsqueeze(2)
    eye = torch.eye(kxx.shape[-1], dtype=kxx.dtype, device=kxx.device)
    chol = robust_cholesky(kxx + ridge * eye)                             # (B, k, k) lower
    # f = kzx^T (L L^T)^{-1} Y = (L^{-1} kzx)^T (L^{-1} Y): one forward substitution with the k + c
    # right-hand sides [kzx | Y] instead of a forward and a backward one (cholesky_solve).
    with serial_lapack(chol):
        w = torch.linalg.solve_triangular(chol, torch.cat([kzx.unsqueeze(2), yg], dim=2), upper=False)
    return (w[:, :, :1] * w[:, :, 1:]).sum(1)


def sparse_krr_core(z: Tensor, x: Tensor, y2: Tensor, idx: Tensor, kern: type[Kernel], lengthscale, ridge,
                    chunk_size: int | None = None, solve_dtype: torch.dtype | None = None,
                    continuous: bool = False, taper: float = 0.5) -> Tensor:
    """SK on validated inputs: y2 (N, c), neighbour indices idx (M, k) -> (M, c). No checks here."""
    m, d = z.shape
    k = idx.shape[1]
    out_dtype = z.dtype
    work = solve_dtype or z.dtype
    ls, lam = _cast(lengthscale, work), _cast(ridge, work)
    if kern.stationary:
        # A stationary kernel does not see a common shift; centring on the support mean keeps the
        # rounding error of the local matmul expansion (about eps ||x||^2) small next to the distances.
        centre = x.detach().mean(0)
        x, z = x - centre, z - centre
    # Without a gradient to x the gathered neighbours, the one large per-chunk tensor, go to a single
    # reused buffer instead of fresh memory per chunk.
    reuse = not (torch.is_grad_enabled() and x.requires_grad)
    chunk = chunk_size or default_chunk_size(m, k * (d + k + y2.shape[1]), LOCAL_BLOCK_ELEMENTS)
    gathered = x.new_empty(min(chunk, m) * k, d) if reuse else None
    out = []
    for start in range(0, m, chunk):
        ic = idx[start:start + chunk]
        b = ic.shape[0]
        flat = ic.reshape(-1)
        if reuse:
            xg = torch.index_select(x, 0, flat, out=gathered[:b * k]).view(b, k, d).to(work)
        else:
            xg = x.index_select(0, flat).view(b, k, d).to(work)
        yg = y2.index_select(0, flat).view(b, k, -1).to(work)
        out.append(local_predict(z[start:start + chunk].to(work), xg, yg, kern, ls, lam, continuous, taper))
    if not out:
        return z.new_zeros(0, y2.shape[1], dtype=out_dtype)
    return torch.cat(out).to(out_dtype)


def check_indices(indices: Tensor, m: int, n: int, need: int, device) -> Tensor:
    if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.shape[0] != m:
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a tensor of shape (M={m}, k'), got {shape}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.shape[1] < need:
        raise ValueError(f"indices has {indices.shape[1]} columns but {need} neighbours are needed (k' >= k)")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"indices out of range [0, {n})")
    return indices[:, :need].to(device=device, dtype=torch.long)


def sparse_krr(z: Tensor, x: Tensor, y: Tensor, k: int = 32, kernel: str = "gaussian",
               lengthscale: float | Tensor | str = 1.0, ridge: float | Tensor = 1e-3,
               chunk_size: int | None = None, backend: str = "torch", solve_dtype: torch.dtype | None = None,
               indices: Tensor | None = None, continuous: bool = False, taper: float = 0.5) -> Tensor:
    """Sparse Kernel prediction: a k x k kernel ridge regression around each evaluation point.

    Args:
        z: (M, d) evaluation points. x: (N, d) support representations. y: (N, c) or (N,) targets.
        k: neighbours per point (k >= N uses all N: exact KRR).
        kernel: a name in ``sk.KERNELS`` (gaussian, laplacian, matern32, matern52, imq, linear).
        lengthscale: float or 0-dim tensor > 0 (gets its gradient if it requires grad), or ``"auto"``
            (``sk.auto_lengthscale(x, k)``).
        ridge: lambda >= 0, float or 0-dim tensor.
        chunk_size: evaluation points per chunk of the local solves (default: bounded (B, k, d) blocks);
            the search chooses its own chunks from (M, N).
        backend: neighbour search, ``"torch"`` | ``"faiss"`` | ``"faiss-ivf"`` (see ``sk.knn_search``).
        solve_dtype: e.g. ``torch.float64`` to form and solve the local systems in float64 when the inputs
            are float32 (the result is cast back).
        indices: precomputed neighbour indices (M, k') sorted by distance, k' >= k (k + 1 with
            ``continuous``); the first k are used, so one search serves a sweep over k, kernel,
            lengthscale and ridge.
        continuous: weights that vanish at the (k+1)-th neighbour make f continuous in z (module doc).
        taper: width of the weight fall-off for ``continuous``, in (0, 1].

    Returns:
        (M, c), or (M,) for one-dimensional y; dtype and device of z.
    """
    check_inputs(z, x, y, k)
    kern = _resolve_kernel(kernel)
    check_ridge(ridge)
    if continuous and not 0.0 < taper <= 1.0:
        raise ValueError(f"taper must be in (0, 1], got {taper}")
    n = x.shape[0]
    k_eff = min(k, n)
    continuous = continuous and k < n  # with k >= N the neighbour set never changes
    need = k_eff + 1 if continuous else k_eff
    lengthscale = resolve_lengthscale(lengthscale, x, k_eff)
    y2 = (y.unsqueeze(1) if y.dim() == 1 else y).to(z.dtype)
    if indices is None:
        _, idx = knn_search(z, x, need, backend=backend)
    else:
        idx = check_indices(indices, z.shape[0], n, need, z.device)
    out = sparse_krr_core(z, x, y2, idx, kern, lengthscale, ridge, chunk_size, solve_dtype, continuous, taper)
    return out.squeeze(1) if y.dim() == 1 else out


def exact_krr(z: Tensor, x: Tensor, y: Tensor, kernel: str = "gaussian", lengthscale: float | Tensor | str = 1.0,
              ridge: float | Tensor = 1e-3, chunk_size: int | None = None,
              solve_dtype: torch.dtype | None = None) -> Tensor:
    """Exact kernel ridge regression f(Z) = K(Z, X) (K(X, X) + lambda I)^{-1} Y (Cholesky, jitter if singular).

    Holds the N x N system; the evaluation points are processed in chunks of ``chunk_size`` rows so no
    M x N matrix is held whole. ``lengthscale="auto"`` uses ``sk.auto_lengthscale(x)``. Shapes and dtypes
    as in :func:`sparse_krr`.
    """
    check_inputs(z, x, y)
    kern = _resolve_kernel(kernel)
    check_ridge(ridge)
    lengthscale = resolve_lengthscale(lengthscale, x, 32)
    work = solve_dtype or z.dtype
    ls, lam = _cast(lengthscale, work), _cast(ridge, work)
    y2 = (y.unsqueeze(1) if y.dim() == 1 else y).to(work)
    xw = x.to(work)
    n = x.shape[0]
    gram = kern.gram(xw, xw, ls, same=True)
    alpha = psd_solve(gram + lam * torch.eye(n, dtype=work, device=x.device), y2)   # (N, c)
    chunk = chunk_size or default_chunk_size(z.shape[0], n)
    out = [kern.gram(z[s:s + chunk].to(work), xw, ls) @ alpha for s in range(0, z.shape[0], chunk)]
    res = torch.cat(out).to(z.dtype) if out else z.new_zeros(0, y2.shape[1])
    return res.squeeze(1) if y.dim() == 1 else res
