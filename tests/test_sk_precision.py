"""Half-precision inputs and torch.autocast: SK computes in float32 (or wider) and answers in z's dtype."""
import pytest
import torch
import torch.nn.functional as F

import sk


pytestmark = pytest.mark.usefixtures("one_thread")

HALF = [torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def data(device="cpu", n=300, m=40, d=8, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return torch.randn(m, d, generator=g).to(device), x.to(device), torch.randn(n, c, generator=g).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_precision_inputs(dtype, device):
    """float16/bfloat16 z, x, y: the answer has z's dtype and equals the float32 computation on the same
    (rounded) values up to the output's rounding; the search ranks like a float32 search."""
    z, x, y = data(device)
    zh, xh, yh = z.to(dtype), x.to(dtype), y.to(dtype)
    ref = sk.sparse_krr(zh.float(), xh.float(), yh.float(), k=9, lengthscale=2.0, ridge=1e-2)
    out = sk.sparse_krr(zh, xh, yh, k=9, lengthscale=2.0, ridge=1e-2)
    assert out.dtype == dtype and out.device.type == device
    tol = torch.finfo(dtype).eps * 4
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    _, idx = sk.knn_search(zh, xh, 9)
    assert torch.equal(idx, sk.knn_search(zh.float(), xh.float(), 9)[1])
    labels = torch.arange(300, device=device) % 4
    scores = sk.sparse_krr(zh, xh, labels, k=9, lengthscale=2.0, num_classes=4)
    assert scores.dtype == dtype
    ex = sk.exact_krr(zh, xh, yh, lengthscale=2.0, ridge=1e-2)
    assert ex.dtype == dtype and torch.isfinite(ex.float()).all()
    assert torch.isfinite(sk.weighted_knn(zh, xh, labels, 4)).all()    # exp(s / 0.07) would overflow float16


def test_half_support_with_float32_queries_and_large_norms():
    """A float16 bank with features of norm ~300 (||x||^2 overflows float16): searched in float32, the
    neighbours are right; the bank is converted a block at a time, never as a whole."""
    z, x, y = data(n=500)
    xh = (300.0 * F.normalize(x, dim=1)).half()
    _, idx = sk.knn_search(z * 300, xh, 7)
    assert torch.equal(idx, sk.knn_search(z * 300, xh.float(), 7)[1])
    out = sk.sparse_krr(z * 300, xh, y, k=7, lengthscale=100.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_gives_the_same_values(device):
    """Under autocast SK runs with autocast off: the same values (bit for bit) and gradients."""
    z, x, y = data(device)
    amp = torch.bfloat16 if device == "cpu" else torch.float16
    labels = torch.arange(300, device=device) % 5
    layer = sk.SKLayer(x, y, k=9, lengthscale=2.0, ridge=1e-2, learn_lengthscale=True).to(device)
    calls = {
        "sparse": lambda zz: sk.sparse_krr(zz, x, y, k=9, lengthscale=2.0, ridge=1e-2),
        "labels": lambda zz: sk.sparse_krr(zz, x, labels, k=9, lengthscale=2.0, num_classes=5),
        "continuous": lambda zz: sk.sparse_krr(zz, x, y, k=9, lengthscale=2.0, ridge=1e-2, continuous=True),
        "exact": lambda zz: sk.exact_krr(zz, x, y, lengthscale=2.0, ridge=1e-2),
        "search": lambda zz: sk.knn_search(zz, x, 9)[0],
        "layer": layer,
    }
    for name, fn in calls.items():
        z1 = z.clone().requires_grad_()
        plain = fn(z1)
        z2 = z.clone().requires_grad_()
        with torch.autocast(device_type=device, dtype=amp):
            cast = fn(z2)
        assert cast.dtype == plain.dtype == torch.float32, name
        assert torch.equal(cast, plain), name
        if plain.requires_grad:
            g1, = torch.autograd.grad(plain.sum(), z1)
            g2, = torch.autograd.grad(cast.sum(), z2)
            assert torch.equal(g1, g2), name


def test_autocast_with_half_queries_from_an_autocast_encoder():
    """An encoder under autocast hands SK bfloat16 queries while the bank is float32: accepted, computed in
    float32, returned in the queries' dtype."""
    z, x, y = data()
    enc = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = enc(z)
        out = sk.sparse_krr(q, x, y, k=9, lengthscale=2.0)
    assert q.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    ref = sk.sparse_krr(q.float(), x, y, k=9, lengthscale=2.0).detach()
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    out.float().sum().backward()
    assert enc.weight.grad is not None and torch.isfinite(enc.weight.grad).all()
