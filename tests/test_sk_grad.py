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
