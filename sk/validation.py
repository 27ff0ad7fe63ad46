"""Input validation for SK's public entry points: one home for the checks the contract asks for.

Bad input raises ``ValueError`` with a message that names the problem (``TypeError`` for a non-tensor).
The checks come in two kinds:

- **Python-side** (shapes, dtypes, devices, integer arguments, hyperparameters given as numbers): no
  tensor is read, no synchronisation. ``check_shapes``, ``as_k``, ``as_chunk_size``, ``as_num_classes``,
  ``check_lengthscale``, ``check_ridge``, ``check_taper``, ``check_indices``, ``resolve_kernel``.
- **Value checks** (finite values, label and index ranges, tensor hyperparameters): ``device_checks``
  fuses them into one host read per call. One summation per tensor detects NaN and inf (they
  propagate); only a failed check pays for the elementwise checks that name the culprit.

``sk.krr``, ``sk.modules`` and ``sk.sklearn`` use these helpers; ``check_inputs`` runs them all.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from .kernels import Kernel, kernel_class
from .precision import HALF

__all__ = ["as_k", "as_chunk_size", "as_num_classes", "is_labels", "check_shapes", "check_inputs",
           "device_checks", "check_lengthscale", "check_ridge", "check_hyperparameter", "check_taper",
           "check_labels", "check_indices", "resolve_kernel"]


# -- integers -------------------------------------------------------------------------------------------
def _positive_index(value, message: str) -> int:
    """value as a Python int >= 1 (any integral type; bool and float refused), else ValueError(message)."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"{message}, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{message}, got {value!r}") from None
    if index < 1:
        raise ValueError(f"{message}, got {value!r}")
    return index


def as_k(k) -> int:
    """k as a Python int >= 1: any integral type (int, numpy integers, integer 0-dim tensors); bool,
    float and non-positive values raise ValueError."""
    if isinstance(k, Tensor) and (k.is_floating_point() or k.dtype == torch.bool):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return _positive_index(k, "k must be an integer >= 1")


def as_chunk_size(chunk_size, name: str = "chunk_size") -> int | None:
    """None or a positive integer (rows per chunk); anything else raises ValueError."""
    if chunk_size is None:
        return None
    return _positive_index(chunk_size, f"{name} must be a positive integer or None")


def as_num_classes(num_classes) -> int | None:
    """None, or C as a Python int >= 1 (any integer type); ValueError otherwise."""
    if num_classes is None:
        return None
    try:
        return as_k(num_classes)
    except ValueError:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}") from None


# -- shapes ---------------------------------------------------------------------------------------------
def is_labels(y: Tensor) -> bool:
    """True when y holds class labels (an integer tensor, not bool)."""
    return not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool


def _check_tensor(name: str, t: Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")


def _check_targets(y: Tensor, n: int, num_classes: int | None) -> bool:
    _check_tensor("y", y, (1, 2))
    if y.shape[0] != n:
        raise ValueError(f"row mismatch: y has {y.shape[0]} rows but x has {n}")
    if is_labels(y):
        if num_classes is None:
            raise ValueError(f"y is an integer tensor ({y.dtype}): class labels need num_classes=C "
                             "(or pass one-hot / regression targets as floats)")
        if y.dim() != 1:
            raise ValueError(f"integer labels must be one-dimensional (N,), got shape {tuple(y.shape)}")
        return True
    if not y.is_floating_point():
        raise ValueError(f"y must be floating-point targets or integer labels, got {y.dtype}")
    if num_classes is not None and (y.dim() != 2 or y.shape[1] != num_classes):
        raise ValueError(f"num_classes={num_classes} is for integer labels; float targets of shape "
                         f"{tuple(y.shape)} do not have {num_classes} columns")
    return False


def check_shapes(z: Tensor, x: Tensor, y: Tensor | None, num_classes: int | None = None) -> bool:
    """Shape, dtype and device checks that need no synchronisation; True when y holds class labels.

    z (M, d) and x (N, d) floating point, N >= 1; y (N,) or (N, c) float targets, or (N,) integer labels
    with ``num_classes`` (already a Python int, see ``as_num_classes``); all on one device."""
    _check_tensor("z", z, (2,))
    _check_tensor("x", x, (2,))
    for name, t in (("z", z), ("x", x)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.shape[0] == 0:
        raise ValueError("empty support set: x has no rows")
    if z.shape[1] != x.shape[1]:
        raise ValueError(f"feature size mismatch: z has d={z.shape[1]} but x has d={x.shape[1]}")
    labels = False if y is None else _check_targets(y, x.shape[0], num_classes)
    if z.device != x.device or (y is not None and y.device != x.device):
        raise ValueError("z, x and y must be on the same device")
    return labels


def check_indices(indices: Tensor, m: int, need: int) -> Tensor:
    """Shape and dtype of precomputed neighbour indices (M, k'), k' >= need; returns the first ``need``
    columns (their range goes to the fused value check)."""
    if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.shape[0] != m:
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a tensor of shape (M={m}, k'), got {shape}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.shape[1] < need:
        raise ValueError(f"indices has {indices.shape[1]} columns but {need} neighbours are needed (k' >= k)")
    return indices[:, :need]


# -- hyperparameters ------------------------------------------------------------------------------------
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


def check_hyperparameter(name: str, value) -> None:
    """Python-side check of ``"lengthscale"`` or ``"ridge"``: numbers now, tensors only for their shape
    (their values go to the fused ``device_checks``)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return
    if name == "lengthscale":
        check_lengthscale(value)
    else:
        check_ridge(value)


def check_taper(taper, continuous: bool = True) -> None:
    """The continuous variant's taper must lie in (0, 1]."""
    if continuous and not 0.0 < taper <= 1.0:
        raise ValueError(f"taper must be in (0, 1], got {taper}")


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Integer labels (N,) in [0, num_classes) (one host read)."""
    if labels.dim() != 1:
        raise ValueError(f"integer label targets must be (N,), got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")


def resolve_kernel(kernel, lengthscale) -> tuple[type[Kernel], float | Tensor | str]:
    """The kernel class and the lengthscale to use.

    ``kernel`` is a name, a ``sk.Kernel`` subclass or a ``sk.Kernel`` instance. An instance brings its
    own lengthscale (a tensor; its gradient reaches the instance's ``log_lengthscale``), so passing a
    ``lengthscale`` as well is ambiguous and raises. With a name or a class, ``lengthscale=None``
    means 1.0; ``"auto"`` is returned as is (the caller resolves it).
    """
    if isinstance(kernel, Kernel):
        if lengthscale is not None:
            raise ValueError(f"kernel={type(kernel).__name__}(...) instance carries its own lengthscale "
                             f"({float(kernel.lengthscale.detach()):.4g}); pass lengthscale= only with a kernel "
                             "name, or set it on the instance")
        return type(kernel), kernel.lengthscale
    kern = kernel if isinstance(kernel, type) and issubclass(kernel, Kernel) else kernel_class(kernel)
    if lengthscale is None:
        return kern, 1.0
    if isinstance(lengthscale, str):
        if lengthscale != "auto":
            raise ValueError(f"lengthscale must be a positive number, a 0-dim tensor or 'auto', got {lengthscale!r}")
        return kern, lengthscale
    check_hyperparameter("lengthscale", lengthscale)
    return kern, lengthscale


# -- value checks (one host read) -----------------------------------------------------------------------
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
                  num_classes: int | None = None, indices: Tensor | None = None, check_x: bool = True,
                  norms: tuple[Tensor | None, Tensor | None] | None = None) -> dict:
    """The checks that read the tensors' values, fused into one host read (one synchronisation).

    One summation per tensor detects NaN or inf (they propagate; tensor hyperparameters are added to the
    same sum); only a failed check pays for the elementwise checks that name the culprit (a finite
    tensor whose sum overflows passes them). ``check_x=False`` skips x (a precomputed support was
    checked when it was prepared). On the CPU the sums, tensor hyperparameters and index ranges are read
    as Python numbers in that one read (a read costs no synchronisation there, and checks in Python save
    tensor operations in small calls); the values of the tensor hyperparameters are returned,
    ``{"lengthscale": float, "ridge": float}``, for callers that then compute with numbers. On other
    devices the checks are one fused boolean and nothing is returned.

    ``norms``: (squared norms of z's rows, of x's rows), either may be None, computed by the caller for
    its own use (``sk.knn.search_norms``): their sums stand for the sums of z and x (one pass fewer over
    each). When such a sum is not finite, the checks are redone on z and x themselves, so that the same
    inputs are refused as without norms; beyond those, a query whose squared norm overflows (finite
    entries beyond ~1e19 in float32) is refused, since every distance to it is inf. A support point's may
    overflow: it is then never a neighbour, as without norms.
    """
    zs, xs = norms if norms is not None else (None, None)
    zs = z if zs is None else zs
    xs = (x if xs is None else xs) if check_x else None
    args = (zs, xs, None if labels else y, lengthscale, ridge, y if labels else None, num_classes, indices,
            x.shape[0])
    if z.device.type == "cpu":
        ok, read = _cpu_checks(*args)
    else:
        ok, read = _device_checks_pass(*args), {}
    if ok:
        return read
    if norms is not None:
        read = device_checks(z, x, y, lengthscale, ridge, labels, num_classes, indices, check_x)
        if norms[0] is not None and not bool(torch.isfinite(norms[0]).all()):
            raise ValueError("z has finite entries whose squares overflow (beyond ~1e19 in float32): every squared "
                             "distance to such a query is inf; scale the inputs")
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
    raise ValueError("inputs failed a value check: the values are finite, but the sum of a tensor overflowed; "
                     "scale the inputs")


def _cpu_checks(z, x, y, lengthscale, ridge, labels, num_classes, indices, n) -> tuple[bool, dict]:
    # Detached rather than under no_grad: a small call would pay more for the context than for the sums.
    parts = [_sum(t.detach() if t.requires_grad else t) for t in (z, x, y) if t is not None]
    sums = len(parts)
    hyper = [(name, v) for name, v in (("lengthscale", lengthscale), ("ridge", ridge)) if isinstance(v, Tensor)]
    parts += [(v.detach() if v.requires_grad else v).reshape(()) for _, v in hyper]
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
    for t, hi in ((labels, num_classes), (indices, n)):
        if t is not None and t.numel():
            lo, top = torch.aminmax(t)
            ok = ok & (lo >= 0) & (top < hi)
    return bool(ok)                 # the one synchronisation
