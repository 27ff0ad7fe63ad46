"""Batched Cholesky solves of symmetric positive (semi-)definite systems, with jitter escalation.

A local system K + lambda I can be singular (duplicated support points with lambda = 0, a linear kernel
with k > d) or lose definiteness to rounding. ``cholesky_ex`` reports such systems instead of raising;
only those are refactorised with a growing multiple of the identity added, so a singular system never
turns into NaN. A system that still fails at the largest jitter raises ``SingularSystemError``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SingularSystemError", "robust_cholesky", "psd_solve"]

# The jitter starts at JITTER_START_EPS * eps(dtype) * mean(diag) and grows tenfold per try up to
# JITTER_MAX_REL * mean(diag): 1.2e-6 .. 1e-2 in float32, 2.2e-15 .. 1e-2 in float64.
JITTER_START_EPS = 10.0
JITTER_MAX_REL = 1e-2


class SingularSystemError(RuntimeError):
    """A kernel system stayed numerically singular after the largest jitter."""


def robust_cholesky(a: Tensor) -> Tensor:
    """Lower Cholesky factor of each matrix in ``a`` (..., n, n), adding jitter only where needed.

    The jitter is a constant (no gradient); autograd flows through the factorisation of a + jitter I.
    """
    batch_shape = a.shape[:-2]
    n = a.shape[-1]
    a3 = a.reshape(-1, n, n)
    factor, info = torch.linalg.cholesky_ex(a3)
    bad = info != 0
    if not bool(bad.any()):
        return factor.reshape(a.shape)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    scale = a3.detach().diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(a.dtype).tiny)
    rel = JITTER_START_EPS * torch.finfo(a.dtype).eps
    while True:
        rows = bad.nonzero().squeeze(1)
        jitter = (rel * scale[rows]).view(-1, 1, 1) * eye
        sub, sub_info = torch.linalg.cholesky_ex(a3[rows] + jitter)
        factor = factor.index_put((rows,), sub)
        bad = bad.index_put((rows,), sub_info != 0)
        if not bool(bad.any()):
            return factor.reshape(a.shape)
        if rel >= JITTER_MAX_REL:
            raise SingularSystemError(
                f"{int(bad.sum())} kernel system(s) of size {n} stayed singular after adding jitter up to "
                f"{JITTER_MAX_REL:g} x mean(diag); check for non-finite kernel values, use a positive ridge "
                f"or solve_dtype=torch.float64"
            )
        rel = min(rel * 10.0, JITTER_MAX_REL)


def psd_solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve a x = b for symmetric positive (semi-)definite a (..., n, n) and b (..., n, c)."""
    return torch.cholesky_solve(b, robust_cholesky(a))
