"""The hard k-NN cut makes f jump where the neighbour set changes; continuous=True does not."""
import pytest
import torch

import sk


pytestmark = pytest.mark.usefixtures("one_thread")


K = 5


def neighbour_set(z, x):
    return frozenset(sk.knn_search(z[None], x, K)[1][0].tolist())


def set_changes(a, b, x, steps=400):
    """Parameters t in [0, 1] where the neighbour set of a + t (b - a) changes, located by bisection."""
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    sets = [neighbour_set(a + t * (b - a), x) for t in ts]
    out = []
    for i in range(steps):
        if sets[i] != sets[i + 1]:
            lo, hi = float(ts[i]), float(ts[i + 1])
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if neighbour_set(a + mid * (b - a), x) == sets[i] else (lo, mid)
            out.append(0.5 * (lo + hi))
    return out


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern52"])
def test_continuous_variant_has_no_jump_where_the_hard_one_jumps(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 2, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    a = torch.tensor([0.1, 0.2], dtype=torch.float64)
    b = torch.tensor([0.9, 0.7], dtype=torch.float64)
    changes = set_changes(a, b, x)
    assert len(changes) >= 3
    for tc in changes[:3]:
        jumps = {}
        for h in (1e-4, 1e-7):
            zz = torch.stack([a + (tc - h) * (b - a), a + (tc + h) * (b - a)])
            for cont in (False, True):
                f = sk.sparse_krr(zz, x, y, k=K, kernel=kernel, lengthscale=0.3, ridge=1e-2, continuous=cont)
                jumps[cont, h] = float((f[1] - f[0]).abs())
        # Hard: the jump does not shrink with the step. Continuous: it shrinks like the step.
        assert jumps[False, 1e-7] > 1e-3 and jumps[False, 1e-7] > 0.5 * jumps[False, 1e-4]
        assert jumps[True, 1e-7] < 1e-4 * jumps[False, 1e-7]
        assert jumps[True, 1e-7] < 1e-2 * jumps[True, 1e-4]


def test_continuous_with_k_at_least_n_is_exact_krr():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g, dtype=torch.float64)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(sk.sparse_krr(z, x, y, k=20, continuous=True), sk.exact_krr(z, x, y), atol=1e-10)


def test_continuity_weights_vanish_at_the_last_neighbour():
    d2 = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    w = sk.continuity_weights(d2, taper=0.5)
    assert w[0, -1] == 0 and w[0, 0] == 1 and w[0, 1] == 1 and 0 < w[0, 3] < 1
    with pytest.raises(ValueError, match="taper"):
        sk.sparse_krr(torch.randn(2, 3), torch.randn(9, 3), torch.randn(9), k=3, continuous=True, taper=0.0)


def cube(rotate: bool):
    """The 8 corners of a cube around the origin (all equidistant from it), optionally rotated by a random
    orthogonal matrix so that the computed distances agree only to rounding."""
    c = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float64) - 0.5
    if rotate:
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
        c = c @ q
    return c


@pytest.mark.parametrize("rotate", [False, True], ids=["exact", "rotated"])
@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_all_k_plus_one_equidistant_gives_the_hard_answer(kernel, rotate):
    """k + 1 nearest all at one distance: the weights' range is 0 (0/0); the variant must not return 0 but
    the hard variant's answer (first k by index), with finite gradients."""
    x = torch.cat([cube(rotate), 3.0 + torch.rand(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)])
    y = torch.arange(1.0, 14.0, dtype=torch.float64)[:, None] * torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    z = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    for k in (3, 5):
        hard = sk.sparse_krr(z, x, y, k=k, kernel=kernel, lengthscale=0.7, ridge=1e-2)
        cont = sk.sparse_krr(z, x, y, k=k, kernel=kernel, lengthscale=0.7, ridge=1e-2, continuous=True)
        assert hard.abs().min() > 0.1                     # a real answer, not the prior's 0
        assert torch.allclose(cont, hard, rtol=1e-9, atol=1e-12), k
        grad, = torch.autograd.grad(cont.sum(), z)
        assert torch.isfinite(grad).all()


def test_first_k_equidistant_and_a_farther_boundary_give_the_hard_answer():
    """r_1 = ... = r_k < r_(k+1): the neighbour set is unambiguous, every weight is 1: the hard answer."""
    ring = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]], dtype=torch.float64)
    x = torch.cat([ring, 2.0 * ring, torch.tensor([[0, 0, 3.0]], dtype=torch.float64)])
    y = torch.randn(9, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z = torch.zeros(1, 3, dtype=torch.float64)
    hard = sk.sparse_krr(z, x, y, k=4, lengthscale=0.8, ridge=1e-2)
    cont = sk.sparse_krr(z, x, y, k=4, lengthscale=0.8, ridge=1e-2, continuous=True)
    assert torch.allclose(cont, hard, rtol=1e-12, atol=1e-14)
    assert hard.abs().max() > 1e-3


def test_continuity_weights_tie_rule():
    w = sk.continuity_weights(torch.full((2, 4), 2.5, dtype=torch.float64), taper=0.5)
    assert w.tolist() == [[1.0, 1.0, 1.0, 0.0]] * 2
    w0 = sk.continuity_weights(torch.zeros(1, 3), taper=1.0)       # k + 1 duplicates of the query
    assert w0.tolist() == [[1.0, 1.0, 0.0]]
