"""Batched Cholesky solves of symmetric positive (semi-)definite systems, with jitter escalation.

A local system K + lambda I can be singular (duplicated support points with lambda = 0, a linear kernel
with k > d) or lose definiteness to rounding. ``cholesky_ex`` reports such systems instead of raising;
only those are refactorised with a growing multiple of the identity added, so a singular system never
turns into NaN. A system that still fails at the largest jitter raises ``SingularSystemError``.

The solves that SK differentiates through have their own backward (``solve_quadratic``, ``solve_spd``):
from the forward's factor, the gradient of f = k^T A^{-1} Y costs one triangular solve with two right-hand
sides and an outer product, where autograd's chain through ``cholesky`` and ``solve_triangular`` costs
several batched triangular solves and matmuls per chunk. Their backward runs its small batched LAPACK calls
on one thread (``serial_lapack``), as the forward does, and at full float32 precision. (When A needs no
gradient and torch runs one thread, ``solve_quadratic`` leaves the one triangular solve to autograd, whose
C++ node costs less than a Python backward.) Under
``create_graph`` (second derivatives, ``torch.func``) the backward refactorises differentiably, so
higher derivatives are exact too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functions import apply
from .precision import full_precision_matmuls

__all__ = ["SingularSystemError", "robust_cholesky", "psd_solve", "serial_lapack", "solve_quadratic", "solve_spd"]

# Matrices up to this size are "small": on the CPU their batched factorisations run single-threaded.
SMALL_SYSTEM = 256

# The jitter starts at JITTER_START_EPS * eps(dtype) * mean(diag) and grows tenfold per try up to
# JITTER_MAX_REL * mean(diag): 1.2e-6 .. 1e-2 in float32, 2.2e-15 .. 1e-2 in float64.
JITTER_START_EPS = 10.0
JITTER_MAX_REL = 1e-2


class serial_lapack:  # noqa: N801 - used as a function: ``with serial_lapack(t):``
    """Run the enclosed batched LAPACK calls on one CPU thread when ``t`` is a batch of small matrices.

    torch factorises a batch one matrix at a time, and MKL may open a parallel region for each small
    matrix; on a machine whose cores are busy with other work, every such region waits for a time
    slice, and a batch of thousands of 32 x 32 systems was measured 10-100x slower than on one thread.
    A small system gains nothing from threads, so they are switched off around these calls (the
    thread count is process state: another Python thread's torch work sees one thread meanwhile).
    A class, not a generator: entered several times per call, it costs a few hundred nanoseconds.
    """

    __slots__ = ("threads",)

    def __init__(self, t: Tensor):
        small = t.device.type == "cpu" and t.shape[-1] <= SMALL_SYSTEM
        self.threads = torch.get_num_threads() if small else 1

    def __enter__(self) -> None:
        if self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.threads > 1:
            torch.set_num_threads(self.threads)


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
    """Solve a x = b for symmetric positive (semi-)definite a (..., n, n) and b (..., n, c) (jitter where
    needed, see ``robust_cholesky``); differentiable in a and b."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    n, c = a.shape[-1], b.shape[-1]
    a3 = a.expand(*batch, n, n).reshape(-1, n, n)
    b3 = b.expand(*batch, n, c).reshape(-1, n, c)
    return solve_spd(a3, b3, robust_cholesky(a3.detach())).reshape(*batch, n, c)


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _differentiable_factor(a: Tensor, factor: Tensor) -> Tensor:
    """The Cholesky factor of a as a function of a (for a backward under ``create_graph``): of a plus the
    jitter that ``factor`` was computed with (L L^T - a, a constant), so that it equals ``factor``."""
    return torch.linalg.cholesky(a + (factor @ factor.mT - a).detach())


def solve_quadratic(k: Tensor, a: Tensor, y: Tensor, factor: Tensor) -> Tensor:
    r"""f = k^T A^{-1} Y for each batch: k (B, n), A (B, n, n) symmetric positive definite, Y (B, n, c),
    ``factor`` (B, n, n) the lower Cholesky factor of A (computed without graph, jitter included) -> (B, c).

    Forward: one forward substitution with the n x (1 + c) right-hand side [k | Y], W = L^{-1} [k | Y], and
    f = W_k^T W_Y. Backward, with eta = A^{-1} k and a = A^{-1} Y g (one backward substitution with
    [W_k | W_Y g]): dk = a, dY = eta g^T, dA = -(eta a^T + a eta^T) / 2 (A is symmetric)."""
    if torch.is_grad_enabled() and (a.requires_grad or ((k.requires_grad or y.requires_grad)
                                                         and torch.get_num_threads() > 1 and a.device.type == "cpu")):
        return apply(_SolveQuadratic, k, a, y, factor)[0]
    # No gradient to A on one thread: autograd's backward of the substitution alone (one triangular solve)
    # costs less than a Python Function's.
    w = torch.linalg.solve_triangular(factor, torch.cat([k.unsqueeze(2), y], dim=2), upper=False)
    return (w[:, :, :1] * w[:, :, 1:]).sum(1)


def solve_spd(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    r"""X = A^{-1} B for each batch: A (B, n, n) symmetric positive definite, B (B, n, r), ``factor`` its
    lower Cholesky factor (no graph, jitter included) -> (B, n, r). Backward: U = A^{-1} G, dB = U,
    dA = -(U X^T + X U^T) / 2."""
    if _needs_graph(a, b):
        return apply(_SolveSPD, a, b, factor)
    return _SolveSPD.forward(a, b, factor)


class _SolveQuadratic(torch.autograd.Function):
    @staticmethod
    def forward(k: Tensor, a: Tensor, y: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
        with serial_lapack(factor):
            w = torch.linalg.solve_triangular(factor, torch.cat([k.unsqueeze(2), y], dim=2), upper=False)
        return (w[:, :, :1] * w[:, :, 1:]).sum(1), w

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*inputs, output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_w: Tensor | None):
        k, a, y, factor, w = ctx.saved_tensors
        with serial_lapack(factor), full_precision_matmuls():
            if torch.is_grad_enabled():
                factor = _differentiable_factor(a, factor)
                w = torch.linalg.solve_triangular(factor, torch.cat([k.unsqueeze(2), y], dim=2), upper=False)
            wyg = (w[:, :, 1:] * grad.unsqueeze(1)).sum(2, keepdim=True)                    # L^{-1} Y g
            both = torch.linalg.solve_triangular(factor.mT, torch.cat([w[:, :, :1], wyg], dim=2), upper=True)
        beta, ag = both[:, :, 0], both[:, :, 1]
        need_k, need_a, need_y, _ = ctx.needs_input_grad
        da = None
        if need_a:
            outer = beta.unsqueeze(2) * ag.unsqueeze(1)
            da = (outer + outer.transpose(1, 2)) * -0.5
        return (ag if need_k else None), da, (beta.unsqueeze(2) * grad.unsqueeze(1) if need_y else None), None


class _SolveSPD(torch.autograd.Function):
    @staticmethod
    def forward(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
        with serial_lapack(factor):
            return torch.cholesky_solve(b, factor)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, factor, x = ctx.saved_tensors
        with serial_lapack(factor), full_precision_matmuls():
            if torch.is_grad_enabled():
                factor = _differentiable_factor(a, factor)
                x = torch.cholesky_solve(b, factor)
            u = torch.cholesky_solve(grad, factor)
        da = None
        if ctx.needs_input_grad[0]:
            outer = u @ x.mT
            da = (outer + outer.mT) * -0.5
        return da, (u if ctx.needs_input_grad[1] else None), None
