"""Gradients of SK: torch.autograd.gradcheck (float64) for z, x, y, the lengthscale and the ridge."""
import pytest
import torch
from torch.autograd import gradcheck

import sk


pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = ["gaussian", "laplacian", "matern32", "matern52", "imq", "linear"]


def small(coincide: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    if coincide:
        z[0] = x[3]      # r = 0 between a query and a support point (and on every local diagonal)
        z[2] = x[8]
    return z, x, y


@pytest.mark.parametrize("coincide", [False, True], ids=["generic", "query-on-support"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_sparse_krr(kernel, coincide):
    z, x, y = small(coincide)
    ls = torch.tensor(1.1, dtype=torch.float64)
    lam = torch.tensor(0.05, dtype=torch.float64)
    _, idx = sk.knn_search(z, x, 5)   # fixed neighbour sets: finite differences must not cross a change
    inputs = tuple(t.clone().requires_grad_() for t in (z, x, y, ls, lam))

    def f(z, x, y, ls, lam):
        return sk.sparse_krr(z, x, y, k=5, kernel=kernel, lengthscale=ls, ridge=lam, indices=idx)

    assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    out = f(*inputs).sum()
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_exact_krr(kernel):
    z, x, y = small(coincide=True)
    inputs = tuple(t.clone().requires_grad_() for t in (z, x, y, torch.tensor(1.1, dtype=torch.float64)))

    def f(z, x, y, ls):
        return sk.exact_krr(z, x, y, kernel=kernel, lengthscale=ls, ridge=0.05)

    assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern52"])
def test_gradcheck_continuous_variant(kernel):
    z, x, y = small(coincide=True)
    _, idx = sk.knn_search(z, x, 6)
    inputs = tuple(t.clone().requires_grad_() for t in (z, x, y, torch.tensor(1.1, dtype=torch.float64)))

    def f(z, x, y, ls):
        return sk.sparse_krr(z, x, y, k=5, kernel=kernel, lengthscale=ls, ridge=0.05, indices=idx,
                             continuous=True)

    assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_safe_norm_gradient_is_zero_at_zero():
    sq = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    r = sk.safe_norm_from_sq(sq)
    r.sum().backward()
    assert r.tolist() == [0.0, 2.0]
    assert sq.grad.tolist() == [0.0, 0.25]


# -- backward across chunks, against an independent reference ---------------------------------------------
def reference_sk(z, x, y, k, lengthscale, ridge, continuous=False, taper=0.5):
    """SK written from the contract alone: exact k-NN from the full distance matrix (stable sort: ties
    to the lower index), Gaussian kernel from explicit differences, batched torch.linalg.solve."""
    d2 = ((z[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    need = k + 1 if continuous else k
    idx = torch.sort(d2.detach(), dim=1, stable=True).indices[:, :need]
    xg, yg = x[idx], y[idx]                                         # (M, k', d), (M, k', c)
    dz = ((xg - z[:, None, :]) ** 2).sum(-1)                       # (M, k')
    dxx = ((xg[:, :, None, :] - xg[:, None, :, :]) ** 2).sum(-1)   # (M, k', k')
    kzx = torch.exp(-dz / (2 * lengthscale ** 2))
    kxx = torch.exp(-dxx / (2 * lengthscale ** 2))
    if continuous:
        hi, lo = dz.max(1, keepdim=True).values, dz.min(1, keepdim=True).values
        t = ((hi - dz) / (taper * (hi - lo))).clamp(0, 1)
        w = t * t * (3 - 2 * t)
        kxx, kzx, yg = w[:, :, None] * kxx * w[:, None, :], kzx * w, yg * w[:, :, None]
    eye = torch.eye(need, dtype=x.dtype)
    alpha = torch.linalg.solve(kxx + ridge * eye, yg)
    return (kzx[:, None, :] @ alpha).squeeze(1)


COMBOS = [(gz, gx, gy) for gz in (False, True) for gx in (False, True) for gy in (False, True)]


@pytest.mark.parametrize("continuous", [False, True], ids=["hard", "continuous"])
@pytest.mark.parametrize("grads", COMBOS, ids=[f"z{int(a)}x{int(b)}y{int(c)}" for a, b, c in COMBOS])
def test_backward_across_many_chunks_matches_reference(grads, continuous):
    """Every mix of fixed and learned z, x, y (the lengthscale always learned, so that even the all-fixed
    case has a gradient), with chunks of 1, 7 and all points: the same values and gradients as the
    reference. A fixed support with learned queries over several chunks once crashed ("modified by an
    inplace operation") because a reused gather buffer was overwritten while autograd held it."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(23, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y0 = torch.randn(60, 3, generator=g, dtype=torch.float64)
    cot = torch.randn(23, 3, generator=g, dtype=torch.float64)     # a random cotangent, not just ones

    def leaves():
        ts = [t.clone().requires_grad_(flag) for t, flag in zip((z0, x0, y0), grads)]
        return ts + [torch.tensor(0.9, dtype=torch.float64, requires_grad=True)]

    ref_in = leaves()
    ref = reference_sk(*ref_in[:3], 5, ref_in[3], 0.05, continuous)
    ref_grads = torch.autograd.grad((ref * cot).sum(), [t for t in ref_in if t.requires_grad])
    for chunk in (1, 7, None):
        ins = leaves()
        out = sk.sparse_krr(*ins[:3], k=5, lengthscale=ins[3], ridge=0.05, chunk_size=chunk, continuous=continuous)
        assert torch.allclose(out, ref, atol=1e-10), chunk
        got = torch.autograd.grad((out * cot).sum(), [t for t in ins if t.requires_grad])
        for a, b in zip(got, ref_grads):
            assert torch.allclose(a, b, atol=1e-9), chunk


def test_layer_with_fixed_support_trains_queries_over_many_chunks():
    """The issue's crash: SKLayer(fixed features, targets), a batch that spans several local chunks, backward
    to the queries (here forced to many chunks by a small local budget)."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(400, 16, generator=g, dtype=torch.float64)
    targets = torch.randn(400, 10, generator=g, dtype=torch.float64)
    layer = sk.SKLayer(feats, targets, k=8, lengthscale=2.0, ridge=1e-2)
    z = torch.randn(120, 16, generator=g, dtype=torch.float64, requires_grad=True)
    with sk.block_budget(local_bytes=8 * 1024):                     # a few points per chunk
        out = layer(z)
    out.square().sum().backward()
    zr = z.detach().clone().requires_grad_()
    reference_sk(zr, feats, targets, 8, 2.0, 1e-2).square().sum().backward()
    assert torch.allclose(z.grad, zr.grad, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grads", [(True, False, False), (True, True, True), (False, True, True)])
def test_cuda_backward_across_chunks_matches_reference(grads):
    g = torch.Generator().manual_seed(3)
    z0, x0 = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randn(2000, 8, generator=g, dtype=torch.float64)
    y0 = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    ins = [t.cuda().requires_grad_(f) for t, f in zip((z0, x0, y0), grads)]
    with sk.block_budget(local_bytes=64 * 1024):
        out = sk.sparse_krr(*ins, k=16, lengthscale=1.5, ridge=1e-2)
    out.sum().backward()
    ref_in = [t.clone().requires_grad_(f) for t, f in zip((z0, x0, y0), grads)]
    ref = reference_sk(*ref_in, 16, 1.5, 1e-2)
    ref.sum().backward()
    assert torch.allclose(out.cpu(), ref, atol=1e-9)
    for a, b in zip(ins, ref_in):
        if b.requires_grad:
            assert torch.allclose(a.grad.cpu(), b.grad, atol=1e-8)


@pytest.mark.parametrize("learned", ["queries-and-support", "queries"])
def test_second_derivatives(learned):
    """Higher derivatives go through the local solves (the Gram's own backward is differentiable, and so is
    the queries' distances' on a fixed support)."""
    z, x, y = small(coincide=False)
    _, idx = sk.knn_search(z, x, 5)
    inputs = (z.clone().requires_grad_(), x.clone().requires_grad_(learned == "queries-and-support"))

    def f(z, x):
        return sk.sparse_krr(z, x, y, k=5, kernel="matern52", lengthscale=1.1, ridge=0.05, indices=idx)

    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_chunks_in_parallel_threads_match_one_thread(mode, monkeypatch):
    """With several torch threads on the CPU the local chunks that record no graph run in parallel worker
    threads (grad and inference mode carried into them); chunks that record a graph run in the calling
    thread (autograd's thread-local state stays with it). The same values and gradients as one thread."""
    g = torch.Generator().manual_seed(4)
    z0, x0 = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(80, 4, generator=g, dtype=torch.float64)
    y0 = torch.randn(80, 2, generator=g, dtype=torch.float64)
    workers = []
    real = sk.chunks.ThreadPoolExecutor

    def spy(n):
        workers.append(n)
        return real(n)

    monkeypatch.setattr(sk.chunks, "ThreadPoolExecutor", spy)

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            z, x = z0.clone().requires_grad_(), x0.clone().requires_grad_()
            if mode == "grad":
                out = sk.sparse_krr(z, x, y0, k=6, lengthscale=1.2, chunk_size=4)
                return (out, *torch.autograd.grad(out.square().sum(), (z, x)))
            ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
            with ctx:
                out = sk.sparse_krr(z, x, y0, k=6, lengthscale=1.2, chunk_size=4)
            assert not out.requires_grad and out.is_inference() == (mode == "inference")
            return (out,)
        finally:
            torch.set_num_threads(before)

    serial = run(1)
    assert workers == []
    parallel = run(2)
    assert workers == ([] if mode == "grad" else [2]) and torch.get_num_threads() == 1   # the fixture's count
    for a, b in zip(serial, parallel):
        assert torch.allclose(a, b, atol=1e-12)
