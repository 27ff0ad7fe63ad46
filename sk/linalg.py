"""Batched Cholesky solves of symmetric positive (semi-)definite systems, with jitter escalation.

A local system K + lambda I can be singular (duplicated support points with lambda = 0, a linear kernel
with k > d) or lose definiteness to rounding. ``cholesky_ex`` reports such systems instead of raising;
only those are refactorised with a growing multiple of the identity added, so a singular system never
turns into NaN. A system that still fails at the largest jitter raises ``SingularSystemError``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["SingularSystemError", "robust_cholesky", "psd_solve", "serial_lapack"]

# Matrices up to this size are "small": on the CPU their batched factorisations run single-threaded.
SMALL_SYSTEM = 256

# The jitter starts at JITTER_START_EPS * eps(dtype) * mean(diag) and grows tenfold per try up to
# JITTER_MAX_REL * mean(diag): 1.2e-6 .. 1e-2 in float32, 2.2e-15 .. 1e-2 in float64.
JITTER_START_EPS = 10.0
JITTER_MAX_REL = 1e-2


@contextmanager
def serial_lapack(t: Tensor):
    """Run the enclosed batched LAPACK calls on one CPU thread when ``t`` is a batch of small matrices.

    torch factorises a batch one matrix at a time, and MKL may open a parallel region for each small
    matrix; on a machine whose cores are busy with other work, every such region waits for a time
    slice, and a batch of thousands of 32 x 32 systems was measured 10-100x slower than on one thread.
    A small system gains nothing from threads, so they are switched off around these calls (the
    thread count is process state: another Python thread's torch work sees one thread meanwhile).
    """
    threads = torch.get_num_threads()
    if t.device.type != "cpu" or threads == 1 or t.shape[-1] > SMALL_SYSTEM:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SingularSystemError(RuntimeError):
    """A kernel system stayed numerically singular after the largest jitter."""


def robust_cholesky(a: Tensor) -> Tensor:
    """Lower Cholesky factor of each matrix in ``a`` (..., n, n), adding jitter only where needed.

    The jitter is a constant (no gradient); autograd flows through the factorisation of a + jitter I.
    """
    n = a.shape[-1]
    a3 = a.reshape(-1, n, n)
    with serial_lapack(a3):
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
        with serial_lapack(a3):
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
    factor = robust_cholesky(a)
    with serial_lapack(a):
        return torch.cholesky_solve(b, factor)
