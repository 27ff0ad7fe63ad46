"""Kernels own their Gram: a kernel of the dot product defined by a user gets its own arithmetic on every
path (plain, a PrecomputedSupport with and without its stored table, exact KRR), never the linear kernel's."""
import pytest
import torch

import sk

pytestmark = pytest.mark.usefixtures("one_thread")


class Poly2(sk.DotProductKernel):
    r"""(1 + a.b / l^2)^2: a polynomial kernel, defined here as a user would."""

    name = "poly2"

    @staticmethod
    def k(inner, lengthscale):
        return (1.0 + inner / (lengthscale * lengthscale)) ** 2


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(17, 3, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g, dtype=torch.float64),
            torch.randn(40, 2, generator=g, dtype=torch.float64))


def reference(z, x, y, k, lengthscale, ridge):
    """The contract's SK for k(a, b) = (1 + a.b / l^2)^2, one query at a time from explicit dot products."""
    d2 = ((z[:, None] - x[None]) ** 2).sum(-1)
    out = []
    for m in range(z.shape[0]):
        idx = torch.sort(d2[m], stable=True).indices[:k]
        xi = x[idx]
        kxx = (1 + xi @ xi.T / lengthscale ** 2) ** 2
        kzx = (1 + z[m] @ xi.T / lengthscale ** 2) ** 2
        out.append(kzx @ torch.linalg.solve(kxx + ridge * torch.eye(k, dtype=x.dtype), y[idx]))
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [None, 4], ids=["one-chunk", "chunks"])
def test_a_users_dot_product_kernel_on_every_path(chunk):
    z, x, y = data()
    kw = dict(k=6, kernel=Poly2, lengthscale=1.3, ridge=0.1, chunk_size=chunk)
    expect = reference(z, x, y, 6, 1.3, 0.1)
    paths = {"plain": x, "support": sk.PrecomputedSupport(x), "distances": sk.PrecomputedSupport(x, distances=True)}
    for name, xs in paths.items():
        assert torch.allclose(sk.sparse_krr(z, xs, y, **kw), expect, atol=1e-10), name
    linear = sk.sparse_krr(z, x, y, k=6, kernel="linear", ridge=0.1)
    assert not torch.allclose(linear, expect, atol=1e-3)              # the test can tell the two apart
    everything = dict(kw, k=40)
    exact = sk.exact_krr(z, x, y, kernel=Poly2, lengthscale=1.3, ridge=0.1)
    for name, xs in paths.items():
        assert torch.allclose(sk.sparse_krr(z, xs, y, **everything), exact, atol=1e-8), name


def test_a_dot_product_kernel_gets_its_gradients_through_the_stored_table():
    z, x, y = data(1)
    _, idx = sk.knn_search(z, x, 5)
    sup = sk.PrecomputedSupport(x, distances=True)
    grads = []
    for xs in (x, sup):
        zz, ls = z.clone().requires_grad_(), torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
        out = sk.sparse_krr(zz, xs, y, k=5, kernel=Poly2, lengthscale=ls, ridge=0.1, indices=idx)
        grads.append(torch.autograd.grad(out.square().sum(), (zz, ls)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9)
    ls = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, s: sk.sparse_krr(q, sup, y, k=5, kernel=Poly2, lengthscale=s, ridge=0.1,
                                                              indices=idx), (z.clone().requires_grad_(), ls))


def test_each_kernel_says_what_its_table_holds():
    x = data()[1]
    assert torch.allclose(sk.Gaussian.support_table(x), torch.cdist(x, x) ** 2, atol=1e-12)
    assert torch.allclose(Poly2.support_table(x), x @ x.T)
    assert sk.Linear.support_table.__func__ is Poly2.support_table.__func__       # one table for the family
    d2, sq = torch.tensor([[2.0]]), torch.tensor([[1.5]])
    assert float(Poly2.from_sq_dists(d2, 1.0, lambda: (sq, sq))) == pytest.approx((1 + 0.5) ** 2)
