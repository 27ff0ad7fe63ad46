"""Kernels: one small module per kernel, each a function of the distance r = ||a - b|| (or of a.b).

Every kernel class carries its formula as a static method ``k(sq_dist, lengthscale)`` so that the
functional API (``sk.sparse_krr(..., kernel="gaussian", lengthscale=0.5)``) and the modules
(``sk.Gaussian(lengthscale=0.5, learn_lengthscale=True)``) share one implementation. The lengthscale of
a module is stored as its logarithm when learnable, so it is positive by construction.

Two evaluations are offered, and both are needed by the solvers:

- ``gram(a, b, lengthscale)``: the full kernel matrix between two sets (used by exact KRR), from the
  expansion ||a||^2 - 2 a.b + ||b||^2 (one matmul);
- ``local(z, xg, lengthscale)``: for each evaluation point z_m and its gathered neighbours X_{I_m}, the
  vector K(z_m, X_{I_m}) and the k x k matrix K(X_{I_m}, X_{I_m}), both from one batched matmul of
  the neighbours centred on their query (``local_offsets``): r = 0 is exact and its gradient is
  exact, and rounding is relative to the neighbourhood's scale, not to ||x||.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "Kernel", "Gaussian", "Laplacian", "Matern32", "Matern52", "IMQ", "Linear",
    "KERNELS", "make_kernel", "safe_norm_from_sq", "sq_dists",
]


def safe_norm_from_sq(sq: Tensor) -> Tensor:
    """r = sqrt(sq) with gradient 0 (not inf) where sq == 0.

    sqrt(sq + tiny) would bias every distance; the double ``where`` keeps the value exact and stops the
    infinite derivative of sqrt at 0 from reaching the graph (the inner ``where`` feeds sqrt a 1 there,
    so the masked branch carries no NaN into the backward pass). A zero gradient is the symmetric
    subgradient of ||a - b|| at a = b, and the exact gradient of k(x_i, x_i), which is constant.
    """
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def sq_dists(a: Tensor, b: Tensor, refine: float = 1e-4) -> Tensor:
    """Squared Euclidean distances (..., n, m) between a (..., n, d) and b (..., m, d), clamped at 0.

    Uses ||a||^2 - 2 a.b + ||b||^2 (one matmul). Its rounding error is about eps (||a||^2 + ||b||^2),
    large next to a small distance, so entries below ``refine`` x (||a||^2 + ||b||^2) (near pairs, rare)
    are recomputed from exact differences: r = 0 stays exactly 0 and its gradient exact.
    ``refine=0`` skips that pass.
    """
    a2 = (a * a).sum(-1, keepdim=True)
    b2 = (b * b).sum(-1).unsqueeze(-2)
    d2 = (a2 + b2 - 2.0 * (a @ b.transpose(-1, -2))).clamp_min(0.0)
    if refine > 0:
        near = d2 <= refine * (a2 + b2).detach()
        if bool(near.any()):
            where = near.nonzero(as_tuple=True)
            diff = a[where[:-2] + (where[-2],)] - b[where[:-2] + (where[-1],)]
            d2 = d2.index_put(where, (diff * diff).sum(-1))
    return d2


class Kernel(nn.Module):
    """Base class of the kernels: a lengthscale l > 0 (fixed or learned) and a formula ``k``.

    Args:
        lengthscale: initial l > 0 (a float or 0-dim tensor).
        learn_lengthscale: make l an ``nn.Parameter``; it is stored as log(l), positive by construction.

    Subclasses define ``k(sq_dist, lengthscale)`` for a stationary kernel (a function of r^2).
    """

    name = "kernel"
    stationary = True

    def __init__(self, lengthscale: float | Tensor = 1.0, learn_lengthscale: bool = False):
        super().__init__()
        value = torch.as_tensor(lengthscale, dtype=torch.get_default_dtype()).detach().clone()
        if value.dim() != 0 or not torch.isfinite(value) or value <= 0:
            raise ValueError(f"lengthscale must be a finite positive scalar, got {lengthscale!r}")
        if learn_lengthscale:
            self.log_lengthscale = nn.Parameter(value.log())
        else:
            self.register_buffer("log_lengthscale", value.log())

    @property
    def lengthscale(self) -> Tensor:
        """l = exp(log l), a 0-dim tensor (positive by construction)."""
        return self.log_lengthscale.exp()

    @staticmethod
    def k(sq_dist: Tensor, lengthscale: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- evaluations shared by all stationary kernels -------------------------------------------------
    @classmethod
    def gram(cls, a: Tensor, b: Tensor, lengthscale: Tensor | float, same: bool = False) -> Tensor:
        """K(a, b): (..., n, m) for a (..., n, d), b (..., m, d). ``same=True`` (a is b) makes the
        diagonal distance exactly 0 instead of the expansion's rounding error."""
        d2 = sq_dists(a, b)
        if same:
            d2 = _zero_diagonal(d2)
        return cls.k(d2, lengthscale)

    @classmethod
    def local(cls, z: Tensor, xg: Tensor, lengthscale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Cross vector and local matrix for gathered neighbours.

        Args:
            z: (B, d) evaluation points.
            xg: (B, k, d) their gathered neighbours.
        Returns:
            kzx (B, k) = K(z_m, X_{I_m}), kxx (B, k, k) = K(X_{I_m}, X_{I_m}), and the squared distances
            (B, k) from z_m to its neighbours.

        A stationary kernel sees differences only, so the neighbours are centred on their query
        (``local_offsets(xg - z)``); see there for the numerics.
        """
        return cls.local_offsets(xg + z.neg().unsqueeze(1), lengthscale)

    @classmethod
    def local_offsets(cls, xc: Tensor, lengthscale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``local`` from the neighbours centred on their query, xc (B, k, d) = X_{I_m} - z_m.

        All distances come from one ``bmm`` of xc: ||x_i - z||^2 is its diagonal and
        ||x_i - x_j||^2 = ||xc_i||^2 + ||xc_j||^2 - 2 xc_i.xc_j. Centring on the query makes every
        rounding error relative to the neighbourhood's own scale (about eps r_k^2), however far the
        data lie from the origin; it costs one subtraction on the gathered block and no copy of the
        support. The diagonal entries are sums of squares of the differences, so r = 0 (a query on a
        support point) is exactly 0 with an exact zero gradient; the k x k diagonal is set to 0. Under
        TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``) all these distances carry TF32's
        1e-3 relative error, still relative to the neighbourhood's scale.
        """
        gram = _SelfGram.apply(xc) if xc.requires_grad else torch.bmm(xc, xc.transpose(1, 2))   # (B, k, k)
        sq = gram.diagonal(dim1=1, dim2=2)
        d2xx = (sq.unsqueeze(2) + sq.unsqueeze(1)).sub_(gram, alpha=2.0).clamp_min(0.0)
        d2xx.diagonal(dim1=1, dim2=2).zero_()      # clamp_min keeps its input, not its output: in place is safe
        return cls.k(sq, lengthscale), cls.k(d2xx, lengthscale), sq

    @classmethod
    def local_anchored(cls, z: Tensor, xg: Tensor, lengthscale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``local`` for a support that needs no gradient (xg (B, k, d) modified in place; nearest first).

        The neighbours are centred on the nearest one, a = x_{I_1}: their (B, k, k) distances then come
        from one batched matmul that does not involve z and carries no graph, and the query enters through
        ||x_i - z||^2 = ||x_i - a||^2 + ||z - a||^2 - 2 (x_i - a).(z - a), one (B, k) product. All terms are
        of the neighbourhood's scale, as with ``local_offsets``; the nearest neighbour's own offset is
        exactly 0, so a query on a support point has r = 0 exactly, and its gradient is exact.
        """
        anchor = xg[:, 0].clone()
        xc = xg.sub_(anchor.unsqueeze(1))                                  # (B, k, d), no graph
        gram = torch.bmm(xc, xc.transpose(1, 2))
        sq = gram.diagonal(dim1=1, dim2=2)
        d2xx = (sq.unsqueeze(2) + sq.unsqueeze(1)).sub_(gram, alpha=2.0).clamp_min_(0.0)
        d2xx.diagonal(dim1=1, dim2=2).zero_()
        za = z - anchor                                                    # (B, d), z's graph
        cross = torch.bmm(xc, za.unsqueeze(2)).squeeze(2)                  # (B, k)
        d2z = (sq + (za * za).sum(1, keepdim=True) - 2.0 * cross).clamp_min(0.0)
        return cls.k(d2z, lengthscale), cls.k(d2xx, lengthscale), d2z

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """K(a, b) with this module's lengthscale: a (..., n, d), b (..., m, d) -> (..., n, m)."""
        return self.gram(a, b, self.lengthscale, same=a is b)

    def extra_repr(self) -> str:
        return f"lengthscale={self.lengthscale.item():.4g}, learnable={isinstance(self.log_lengthscale, nn.Parameter)}"


class _SelfGram(torch.autograd.Function):
    """G = A A^T for a batch A (B, k, d), with the backward dA = (dG + dG^T) A: one contiguous bmm where
    autograd's bmm backward does two with transposed operands (measured 2-4x slower on the CPU). The
    backward is made of differentiable ops, so higher derivatives still work."""

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:
        ctx.save_for_backward(a)
        return torch.bmm(a, a.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), a)


def _zero_diagonal(m: Tensor) -> Tensor:
    eye = torch.eye(m.shape[-1], dtype=torch.bool, device=m.device)
    return m.masked_fill(eye, 0.0)


class Gaussian(Kernel):
    r"""Gaussian (squared-exponential, RBF) kernel.

    .. math:: k(a, b) = \exp\!\left(-\frac{r^2}{2\ell^2}\right), \qquad r = \lVert a - b \rVert

    Shapes: ``forward(a (n, d), b (m, d)) -> (n, m)``. Same as scikit-learn's ``rbf`` with
    ``gamma = 1 / (2 l^2)``.

    Example::

        kern = sk.Gaussian(lengthscale=0.5, learn_lengthscale=True)
        K = kern(x, x)                      # (N, N)
    """

    name = "gaussian"

    @staticmethod
    def k(sq_dist: Tensor, lengthscale: Tensor | float) -> Tensor:
        return torch.exp(sq_dist * (-0.5 / (lengthscale * lengthscale)))


class Laplacian(Kernel):
    r"""Laplacian (exponential, Matern-1/2) kernel with the Euclidean distance.

    .. math:: k(a, b) = \exp\!\left(-\frac{r}{\ell}\right), \qquad r = \lVert a - b \rVert_2

    Shapes: ``forward(a (n, d), b (m, d)) -> (n, m)``. Not scikit-learn's ``laplacian``, which uses the
    L1 distance. The gradient at r = 0 is taken as 0 (see :func:`safe_norm_from_sq`).

    Example::

        kern = sk.Laplacian(lengthscale=2.0)
        K = kern(z, x)                      # (M, N)
    """

    name = "laplacian"

    @staticmethod
    def k(sq_dist: Tensor, lengthscale: Tensor | float) -> Tensor:
        return torch.exp(-safe_norm_from_sq(sq_dist) / lengthscale)


class Matern32(Kernel):
    r"""Matern kernel with smoothness 3/2.

    .. math:: k(a, b) = \left(1 + \frac{\sqrt{3}\, r}{\ell}\right) \exp\!\left(-\frac{\sqrt{3}\, r}{\ell}\right)

    Shapes: ``forward(a (n, d), b (m, d)) -> (n, m)``. Differentiable at r = 0 with gradient 0, which the
    safe norm returns exactly.

    Example::

        kern = sk.Matern32(lengthscale=1.0, learn_lengthscale=True)
        K = kern(x, x)                      # (N, N)
    """

    name = "matern32"

    @staticmethod
    def k(sq_dist: Tensor, lengthscale: Tensor | float) -> Tensor:
        s = math.sqrt(3.0) * safe_norm_from_sq(sq_dist) / lengthscale
        return (1.0 + s) * torch.exp(-s)


class Matern52(Kernel):
    r"""Matern kernel with smoothness 5/2.

    .. math:: k(a, b) = \left(1 + \frac{\sqrt{5}\, r}{\ell} + \frac{5 r^2}{3 \ell^2}\right)
              \exp\!\left(-\frac{\sqrt{5}\, r}{\ell}\right)

    Shapes: ``forward(a (n, d), b (m, d)) -> (n, m)``.

    Example::

        kern = sk.Matern52(lengthscale=1.0)
        K = kern(z, x)                      # (M, N)
    """

    name = "matern52"

    @staticmethod
    def k(sq_dist: Tensor, lengthscale: Tensor | float) -> Tensor:
        s = math.sqrt(5.0) * safe_norm_from_sq(sq_dist) / lengthscale
        # 5 r^2 / (3 l^2) is written with sq_dist so that it keeps an exact gradient at r = 0.
        return (1.0 + s + (5.0 / 3.0) * sq_dist / (lengthscale * lengthscale)) * torch.exp(-s)


class IMQ(Kernel):
    r"""Inverse multiquadric kernel.

    .. math:: k(a, b) = \left(1 + \frac{r^2}{\ell^2}\right)^{-1/2}

    Shapes: ``forward(a (n, d), b (m, d)) -> (n, m)``. Heavy-tailed: far neighbours keep some weight.

    Example::

        kern = sk.IMQ(lengthscale=1.0)
        K = kern(x, x)                      # (N, N)
    """

    name = "imq"

    @staticmethod
    def k(sq_dist: Tensor, lengthscale: Tensor | float) -> Tensor:
        return torch.rsqrt(1.0 + sq_dist / (lengthscale * lengthscale))


class Linear(Kernel):
    r"""Linear kernel (the lengthscale is accepted and unused).

    .. math:: k(a, b) = a^\top b

    Shapes: ``forward(a (n, d), b (m, d)) -> (n, m)``. A local system has rank at most d: with k > d
    neighbours use a positive ridge. Same as scikit-learn's ``linear``.

    Example::

        kern = sk.Linear()
        K = kern(z, x)                      # (M, N)
    """

    name = "linear"
    stationary = False

    @staticmethod
    def k(sq_dist: Tensor, lengthscale: Tensor | float) -> Tensor:  # pragma: no cover - not distance-based
        raise TypeError("the linear kernel is not a function of the distance")

    @classmethod
    def gram(cls, a: Tensor, b: Tensor, lengthscale: Tensor | float = 1.0, same: bool = False) -> Tensor:
        return a @ b.transpose(-1, -2)

    @classmethod
    def local(cls, z: Tensor, xg: Tensor, lengthscale: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        kzx = torch.bmm(xg, z.unsqueeze(2)).squeeze(2)
        kxx = torch.bmm(xg, xg.transpose(1, 2))
        diff = xg - z.unsqueeze(1)
        return kzx, kxx, (diff * diff).sum(-1)

    @classmethod
    def local_offsets(cls, xc: Tensor, lengthscale: Tensor | float = 1.0):  # pragma: no cover - not stationary
        raise TypeError("the linear kernel is not translation invariant: use local(z, xg)")


KERNELS: dict[str, type[Kernel]] = {
    cls.name: cls for cls in (Gaussian, Laplacian, Matern32, Matern52, IMQ, Linear)
}


def kernel_class(name: str) -> type[Kernel]:
    """The kernel class for a name; ValueError naming the choices for an unknown one."""
    if not isinstance(name, str) or name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[name]


def make_kernel(name: str, lengthscale: float | Tensor = 1.0, learn_lengthscale: bool = False) -> Kernel:
    """A kernel module by name: ``make_kernel("matern32", 0.5, learn_lengthscale=True)``."""
    return kernel_class(name)(lengthscale=lengthscale, learn_lengthscale=learn_lengthscale)
