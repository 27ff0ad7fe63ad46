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
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["HALF", "work_dtype", "no_autocast"]

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
