"""Precision rules: half-precision inputs and ``torch.autocast``.

- float16 / bfloat16 inputs are accepted everywhere. The neighbour search scores in float32
  (``sk.knn.search_dtype``), the local systems are formed and solved in float32 (or ``solve_dtype``)
  and the result comes back in the evaluation points' dtype. A k x k kernel system in half precision
  would carry 2-3 significant digits: its Cholesky factor is meaningless beyond tiny ridges, and
  torch has no half-precision Cholesky on the CPU anyway.
- Under ``torch.autocast`` SK computes with autocast off, as PyTorch does for its linear-algebra
  ops: autocast would run the matmuls behind the distances in bfloat16/float16 (relative error 1e-3
  to 1e-2 of ||x||^2, enough to move SK's output by percents and exact KRR's by more than 100%). The
  result is the one computed without autocast, in the inputs' dtype.
- Global reduced-precision matmul settings (``torch.set_float32_matmul_precision("high")``,
  ``torch.backends.cuda.matmul.allow_tf32 = True``, or the per-backend ``fp32_precision`` flags), which
  training scripts set for speed, would run SK's float32 matmuls in TF32 (or bfloat16 passes on the
  CPU's oneDNN): the search's scores ``||x||^2 - 2 z.x`` then carry ~1e-3 relative error, neighbours
  change, and an exact KRR Gram loses the accuracy its Cholesky needs. SK runs its search and its
  local systems with float32 matmuls at full precision whatever the global setting
  (``full_precision_matmuls``), as ``torch.linalg`` does, and restores the caller's setting after.
  The setting is process state: another Python thread's matmuls see full precision meanwhile.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["HALF", "work_dtype", "no_autocast", "full_precision_matmuls", "declared_precision"]

HALF = (torch.float16, torch.bfloat16)


def work_dtype(*dtypes: torch.dtype, solve_dtype: torch.dtype | None = None) -> torch.dtype:
    """``solve_dtype`` if given, else the widest input dtype, at least float32."""
    if solve_dtype is not None:
        return solve_dtype
    out = torch.float32
    for dt in dtypes:
        if dt != out and dt not in HALF and dt != torch.float32:
            out = torch.promote_types(out, dt)
    return out


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def no_autocast(device: torch.device):
    """A context that switches autocast off on ``device``'s type, or a no-op when it is not on."""
    if _autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _backend_precisions() -> dict:
    """The per-backend float32 matmul precisions of the new API (``torch.backends.*.fp32_precision``)."""
    backends = torch.backends
    return {"cuda": backends.cuda.matmul.fp32_precision, "mkldnn": backends.mkldnn.matmul.fp32_precision}


def _set_backend_precisions(values: dict) -> None:
    torch.backends.cuda.matmul.fp32_precision = values["cuda"]
    torch.backends.mkldnn.matmul.fp32_precision = values["mkldnn"]


class full_precision_matmuls:  # noqa: N801 - used as a function: ``with full_precision_matmuls():``
    """Float32 matmuls at full precision (no TF32, no bfloat16 passes) inside, the caller's setting after.

    PyTorch has two ways to set the global precision that must not be mixed (reading the legacy one after
    the new one was written raises): ``torch.set_float32_matmul_precision`` / ``allow_tf32`` (legacy)
    and the per-backend ``fp32_precision`` attributes (new). This context speaks the one the caller
    used, and does nothing when the precision is already full (the default): a class, not a generator,
    so that the common case costs about a microsecond.
    """

    __slots__ = ("legacy", "backends")

    def __enter__(self) -> None:
        self.legacy = self.backends = None
        try:
            previous = torch._C._get_float32_matmul_precision()
            tf32 = torch._C._get_cublas_allow_tf32()
        except RuntimeError:        # the caller set the new per-backend flags
            values = _backend_precisions()
            if any(v not in ("none", "ieee") for v in values.values()) or torch.backends.fp32_precision not in (
                    "none", "ieee"):
                self.backends = values
                _set_backend_precisions({"cuda": "ieee", "mkldnn": "ieee"})
            return
        if previous != "highest" or tf32:
            self.legacy = (previous, tf32)
            torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc) -> None:
        if self.legacy is not None:
            torch.set_float32_matmul_precision(self.legacy[0])
            torch.backends.cuda.matmul.allow_tf32 = self.legacy[1]
        elif self.backends is not None:
            _set_backend_precisions(self.backends)


class declared_precision:  # noqa: N801 - used as a function: ``with declared_precision(device):``
    """SK's arithmetic as declared: autocast off on ``device``'s type and full-precision float32 matmuls."""

    __slots__ = ("autocast", "matmuls")

    def __init__(self, device: torch.device):
        self.autocast = no_autocast(device)
        self.matmuls = full_precision_matmuls()

    def __enter__(self) -> None:
        self.autocast.__enter__()
        self.matmuls.__enter__()

    def __exit__(self, *exc) -> None:
        self.matmuls.__exit__(*exc)
        self.autocast.__exit__(*exc)
