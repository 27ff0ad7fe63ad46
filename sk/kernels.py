"""Kernels: one small module per kernel, each a function of the distance r = ||a - b|| or of a.b.

Every kernel class carries its formula as a static method ``k(t, lengthscale)`` of one pairwise quantity
t, so that the functional API (``sk.sparse_krr(..., kernel="gaussian", lengthscale=0.5)``) and the modules
(``sk.Gaussian(lengthscale=0.5, learn_lengthscale=True)``) share one implementation. The lengthscale of
a module is stored as its logarithm when learnable, so it is positive by construction.

A kernel owns its Gram: it says which pairwise quantity it is a function of, and how every evaluation
the solvers need is computed from it. Two families:

- ``Kernel`` (stationary): t = r^2, the squared distance. Gaussian, Laplacian, Matern 3/2 and 5/2, IMQ.
- ``DotProductKernel``: t = a.b, the dot product. ``Linear`` (k = t), and any user's dot-product kernel
  (polynomial, arc-cosine): subclass ``DotProductKernel`` and define ``k``.

The evaluations, each a class method that the family implements:

- ``gram(a, b, lengthscale)``: the full kernel matrix between two sets (exact KRR);
- ``local(z, xg, lengthscale)``: for each evaluation point z_m and its gathered neighbours X_{I_m}, the
  vector K(z_m, X_{I_m}) and the k x k matrix K(X_{I_m}, X_{I_m}) (SK's local systems); stationary
  kernels form them from one batched matmul of the neighbours centred on their query or on their
  query's value when only the query needs a gradient (``local_offsets``, ``local_fixed_support``): r = 0 is
  exact and its gradient is exact,
  and rounding is relative to the neighbourhood's scale, not to ||x||;
- ``support_table(x)`` (N, N) and ``from_sq_dists(d2, lengthscale, sq_norms)``: a support prepared
  once (``sk.PrecomputedSupport(x, distances=True)``) stores the table of the kernel's pairwise quantity,
  of which every local matrix is a sub-block (``k(table[I, I])``), and takes the query's values from the
  search's squared distances (t = r^2 as is, or a.b = (||a||^2 + ||b||^2 - r^2) / 2).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functions import apply

__all__ = [
    "Kernel", "DotProductKernel", "Gaussian", "Laplacian", "Matern32", "Matern52", "IMQ", "Linear",
    "KERNELS", "kernel_class", "make_kernel", "safe_norm_from_sq", "sq_dists",
]

# sq_dists recomputes from exact differences at most this many near entries per row (see there).
REFINE_CANDIDATES = 4


def safe_norm_from_sq(sq: Tensor) -> Tensor:
    """r = sqrt(sq) with gradient 0 (not inf) where sq == 0.

    sqrt(sq + tiny) would bias every distance; the double ``where`` keeps the value exact and stops the
    infinite derivative of sqrt at 0 from reaching the graph (the inner ``where`` feeds sqrt a 1 there,
    so the masked branch carries no NaN into the backward pass). A zero gradient is the symmetric
    subgradient of ||a - b|| at a = b, and the exact gradient of k(x_i, x_i), which is constant.
    """
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def sq_dists(a: Tensor, b: Tensor, refine: float = 1e-4, candidates: int = REFINE_CANDIDATES) -> Tensor:
    """Squared Euclidean distances (..., n, m) between a (..., n, d) and b (..., m, d), clamped at 0.

    Uses ||a||^2 - 2 a.b + ||b||^2 (one matmul). Its rounding error is about eps (||a||^2 + ||b||^2),
    large next to a small distance, so the near entries of each row (below ``refine`` x (||a||^2 +
    ||b||^2); at most ``candidates`` of them, the smallest) are recomputed from exact differences: r = 0
    stays exactly 0 and its gradient exact. The near entries are found per row with a ``topk`` and
    replaced with a ``where``, not by reading them on the host: no synchronisation (a chunked exact KRR
    calls this once per chunk). ``refine=0`` skips that pass.
    """
    a2 = (a * a).sum(-1, keepdim=True)
    b2 = (b * b).sum(-1).unsqueeze(-2)
    d2 = (a2 + b2 - 2.0 * (a @ b.transpose(-1, -2))).clamp_min(0.0)
    c = min(candidates, d2.shape[-1])
    if refine <= 0 or c < 1 or d2.shape[-2] == 0:
        return d2
    cols = torch.topk(d2.detach(), c, dim=-1, largest=False).indices                 # (..., n, c)
    if b.dim() == 2:            # one set b for every batch of a: index it, never expand it
        near_b = b[cols]                                                               # (..., n, c, d)
    else:
        batch, (n, d), m = d2.shape[:-2], a.shape[-2:], b.shape[-2]
        flat = cols.reshape(-1, n * c, 1).expand(-1, -1, d)
        near_b = torch.gather(b.expand(*batch, m, d).reshape(-1, m, d), 1, flat).view(*batch, n, c, d)
    diff = a.unsqueeze(-2) - near_b
    exact = (diff * diff).sum(-1)                                                      # (..., n, c)
    near = d2.detach().gather(-1, cols) <= refine * (a2 + b2.expand_as(d2).gather(-1, cols)).detach()
    return d2.scatter(-1, cols, torch.where(near, exact, d2.gather(-1, cols)))


class Kernel(nn.Module):
    """Base class of the kernels: a lengthscale l > 0 (fixed or learned) and a formula ``k``.

    Args:
        lengthscale: initial l > 0 (a float or 0-dim tensor).
        learn_lengthscale: make l an ``nn.Parameter``; it is stored as log(l), positive by construction.

    Subclasses define ``k(sq_dist, lengthscale)``: a stationary kernel, a function of r^2. (A kernel of the
    dot product subclasses ``DotProductKernel`` instead.)
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
    def support_table(cls, x: Tensor) -> Tensor:
        """The (N, N) table of k's pairwise quantity for a support x (N, d): squared distances
        D_ij = ||x_i - x_j||^2, formed after centring x on its mean (the matmul's rounding is then relative
        to the support's spread, not to its distance from the origin), diagonal exactly 0."""
        c = x - x.mean(0)
        sq = (c * c).sum(1)
        d2 = torch.addmm(sq.unsqueeze(0), c, c.t(), alpha=-2.0).add_(sq.unsqueeze(1))
        return d2.clamp_min_(0.0).fill_diagonal_(0.0)

    @classmethod
    def from_sq_dists(cls, d2: Tensor, lengthscale: Tensor | float, sq_norms) -> Tensor:
        """k(a, b) from the squared distance d2 = ||a - b||^2. ``sq_norms``: a callable that returns the
        squared norms (||a||^2, ||b||^2), broadcastable to d2; a stationary kernel does not call it."""
        return cls.k(d2, lengthscale)

    @classmethod
    def local(cls, z: Tensor, xg: Tensor, lengthscale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Cross vector and local matrix for gathered neighbours.

        Args:
            z: (B, d) evaluation points.
            xg: (B, k, d) their gathered neighbours, nearest first: a block the caller owns, modified in
                place when it needs no gradient.
        Returns:
            kzx (B, k) = K(z_m, X_{I_m}), kxx (B, k, k) = K(X_{I_m}, X_{I_m}), and the squared distances
            (B, k) from z_m to its neighbours.

        A stationary kernel sees differences only, so the neighbours are centred before their distances
        are formed (rounding relative to the neighbourhood, not to ||x||):

        - on their query, in place, when nothing needs a gradient (``local_offsets``);
        - on their query, with the graph, when the support needs one (its gradient flows through the k x k
          Gram anyway; ``local_offsets``);
        - on the query's value, in place and without graph, when only the query needs one (a fixed support,
          learned queries; ``local_fixed_support``): the (B, k, k) Gram carries no graph, and the query's
          gradient goes through its k distances alone. With the Gram in the graph, its backward was two
          (B, k, k, d) batched matmuls per chunk.
        """
        if xg.requires_grad:
            # Out of place (xg is a view: in place would make autograd copy the block), and as xg + (-z),
            # whose backward sums the (B, k, d) gradient before negating it.
            return cls.local_offsets(xg + z.neg().unsqueeze(1), lengthscale)
        if z.requires_grad and torch.is_grad_enabled():
            return cls.local_fixed_support(z, xg, lengthscale)
        return cls.local_offsets(xg.sub_(z.unsqueeze(1)), lengthscale)

    @classmethod
    def local_offsets(cls, xc: Tensor, lengthscale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``local`` from the neighbours centred on their query, xc (B, k, d) = X_{I_m} - z_m.

        All distances come from one ``bmm`` of xc: ||x_i - z||^2 is its diagonal and
        ||x_i - x_j||^2 = ||xc_i||^2 + ||xc_j||^2 - 2 xc_i.xc_j. Centring on the query makes every
        rounding error relative to the neighbourhood's own scale (about eps r_k^2), however far the
        data lie from the origin; it costs one subtraction on the gathered block and no copy of the
        support. The diagonal entries are sums of squares of the differences, so r = 0 (a query on a
        support point) is exactly 0 with an exact zero gradient; the k x k diagonal is exactly 0 too
        (sq_i + sq_i - 2 G_ii with sq_i the very number G_ii: no rounding), and so is its gradient. The
        matmuls run at full float32 precision whatever the global TF32 setting (``sk.precision``).
        """
        gram = apply(_SelfGram, xc) if xc.requires_grad else torch.bmm(xc, xc.transpose(1, 2))   # (B, k, k)
        sq = gram.diagonal(dim1=1, dim2=2)
        sqc = sq.contiguous()      # a strided diagonal in a broadcast add was measured 2x slower
        d2xx = (sqc.unsqueeze(2) + sqc.unsqueeze(1)).sub_(gram, alpha=2.0).clamp_min(0.0)
        return cls.k(sq, lengthscale), cls.k(d2xx, lengthscale), sq

    @classmethod
    def local_fixed_support(cls, z: Tensor, xg: Tensor, lengthscale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``local`` for a support that needs no gradient and queries that do (xg (B, k, d) modified in place).

        The neighbours are centred on the query's value, xc = X_I - z (no graph), and every distance comes
        from one batched matmul of xc as in ``local_offsets``: the same numbers. The query enters the graph
        through its k squared distances alone (``_QuerySqDists``: values from the Gram's diagonal, gradient
        2 sum_j g_j (z - x_j) = -2 sum_j g_j xc_j, one (B, k) x (B, k, d) product in the backward).
        """
        xc = xg.sub_(z.detach().unsqueeze(1))                              # (B, k, d), no graph
        gram = torch.bmm(xc, xc.transpose(1, 2))
        sq = gram.diagonal(dim1=1, dim2=2).contiguous()
        d2xx = (sq.unsqueeze(2) + sq.unsqueeze(1)).sub_(gram, alpha=2.0).clamp_min_(0.0)   # diagonal exactly 0
        d2z = apply(_QuerySqDists, z, xc, sq)                              # (B, k), z's graph
        return cls.k(d2z, lengthscale), cls.k(d2xx, lengthscale), d2z

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """K(a, b) with this module's lengthscale: a (..., n, d), b (..., m, d) -> (..., n, m)."""
        return self.gram(a, b, self.lengthscale, same=a is b)

    def extra_repr(self) -> str:
        return f"lengthscale={self.lengthscale.item():.4g}, learnable={isinstance(self.log_lengthscale, nn.Parameter)}"


class DotProductKernel(Kernel):
    r"""Base class of the kernels of the dot product: k(a, b) = f(a.b), with ``k(inner, lengthscale)``.

    Subclass it and define ``k`` for a polynomial, arc-cosine or any other dot-product kernel; every solver
    (plain path, ``sk.PrecomputedSupport`` with and without distances, exact KRR) then computes it from dot
    products. The lengthscale is passed to ``k`` (a kernel may use it as a scale, or ignore it).

    Example::

        class Poly2(sk.DotProductKernel):
            name = "poly2"

            @staticmethod
            def k(inner, lengthscale):          # (1 + a.b / l^2)^2
                return (1.0 + inner / (lengthscale * lengthscale)) ** 2

        f = sk.sparse_krr(z, x, y, k=16, kernel=Poly2, lengthscale=1.0, ridge=1e-2)
    """

    stationary = False

    @staticmethod
    def k(inner: Tensor, lengthscale: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def gram(cls, a: Tensor, b: Tensor, lengthscale: Tensor | float = 1.0, same: bool = False) -> Tensor:
        return cls.k(a @ b.transpose(-1, -2), lengthscale)

    @classmethod
    def support_table(cls, x: Tensor) -> Tensor:
        """The (N, N) table of dot products X X^T."""
        return x @ x.t()

    @classmethod
    def from_sq_dists(cls, d2: Tensor, lengthscale: Tensor | float, sq_norms) -> Tensor:
        """k(a, b) from the squared distance: a.b = (||a||^2 + ||b||^2 - ||a - b||^2) / 2, the norms from
        the callable ``sq_norms``."""
        sq_a, sq_b = sq_norms()
        return cls.k((sq_a + sq_b - d2) * 0.5, lengthscale)

    @classmethod
    def local(cls, z: Tensor, xg: Tensor, lengthscale: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """kzx (B, k) = k(X_{I_m} z_m), kxx (B, k, k) = k(X_{I_m} X_{I_m}^T) and the squared distances (B, k)
        (for the continuous variant), for z (B, d) and xg (B, k, d)."""
        inner = torch.bmm(z.unsqueeze(1), xg.transpose(1, 2)).squeeze(1)               # (B, k)
        gram = apply(_SelfGram, xg) if xg.requires_grad else torch.bmm(xg, xg.transpose(1, 2))
        diff = xg - z.unsqueeze(1)
        return cls.k(inner, lengthscale), cls.k(gram, lengthscale), (diff * diff).sum(-1)

    @classmethod
    def local_offsets(cls, xc: Tensor, lengthscale: Tensor | float = 1.0):  # pragma: no cover - not stationary
        raise TypeError(f"{cls.__name__} is a kernel of the dot product, not translation invariant: use local(z, xg)")

    local_fixed_support = local_offsets


class _SelfGram(torch.autograd.Function):
    """G = A A^T for a batch A (B, k, d), with the backward dA = (dG + dG^T) A: one contiguous bmm where
    autograd's bmm backward does two with transposed operands (measured 2-4x slower on the CPU). The
    backward is made of differentiable ops, so higher derivatives still work."""

    @staticmethod
    def forward(a: Tensor) -> Tensor:
        return torch.bmm(a, a.transpose(1, 2))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:     # the form that torch.func transforms accept
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), a)


class _QuerySqDists(torch.autograd.Function):
    r"""d_j = ||z - x_j||^2 (B, k) for queries z (B, d) with graph, from their neighbours centred on the
    queries' values, xc = X_I - z (B, k, d), and sq_j = ||xc_j||^2 (B, k), both without gradient.

    Forward: sq (the values are already computed). Backward: 2 \sum_j g_j (z - x_j) = -2 \sum_j g_j xc_j,
    exactly 0 for a query on a support point. Under ``create_graph`` the backward also carries the
    derivative of (z - x_j) in z, 2 \sum_j g_j, so that higher derivatives are exact."""

    @staticmethod
    def forward(z: Tensor, xc: Tensor, sq: Tensor) -> Tensor:
        return sq.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:2])

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, xc = ctx.saved_tensors
        gz = torch.bmm(grad.unsqueeze(1), xc).squeeze(1).mul_(-2.0)                    # (B, d)
        if torch.is_grad_enabled():
            gz = gz + 2.0 * grad.sum(1, keepdim=True) * (z - z.detach())
        return gz, None, None


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


class Linear(DotProductKernel):
    r"""Linear kernel (the lengthscale is accepted and unused).

    .. math:: k(a, b) = a^\top b

    Shapes: ``forward(a (n, d), b (m, d)) -> (n, m)``. A local system has rank at most d: with k > d
    neighbours use a positive ridge. Same as scikit-learn's ``linear``.

    Example::

        kern = sk.Linear()
        K = kern(z, x)                      # (M, N)
    """

    name = "linear"

    @staticmethod
    def k(inner: Tensor, lengthscale: Tensor | float = 1.0) -> Tensor:
        return inner


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
