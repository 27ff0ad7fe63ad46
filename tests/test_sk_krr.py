"""sk.sparse_krr / sk.exact_krr against exact KRR, scikit-learn and a per-query reference solve."""
from contextlib import contextmanager

import pytest
import torch

import sk


pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = ["gaussian", "laplacian", "matern32", "matern52", "imq", "linear"]


def data(n=60, m=25, d=4, c=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, c, generator=g, dtype=dtype)
    z = torch.randn(m, d, generator=g, dtype=dtype)
    return z, x, y


def rel(a, b):
    return float((a - b).norm() / b.norm())


def reference_sparse(z, x, y, k, kernel, lengthscale, ridge):
    """The contract's definition, one evaluation point at a time (torch.linalg.solve)."""
    kern = sk.KERNELS[kernel]
    d2 = ((z[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    out = []
    for m in range(z.shape[0]):
        idx = torch.sort(d2[m], stable=True).indices[:k]
        xi = x[idx]
        kxx = kern.gram(xi, xi, lengthscale, same=True)
        kzx = kern.gram(z[m:m + 1], xi, lengthscale)
        alpha = torch.linalg.solve(kxx + ridge * torch.eye(len(idx), dtype=x.dtype), y[idx])
        out.append((kzx @ alpha)[0])
    return torch.stack(out)


@pytest.mark.parametrize("kernel", KERNELS)
def test_k_at_least_n_equals_exact_krr(kernel):
    z, x, y = data()
    for k in (60, 1000):
        f = sk.sparse_krr(z, x, y, k=k, kernel=kernel, lengthscale=1.3, ridge=1e-2)
        g = sk.exact_krr(z, x, y, kernel=kernel, lengthscale=1.3, ridge=1e-2)
        assert rel(f, g) < 1e-8


@pytest.mark.parametrize("kernel", KERNELS)
def test_k_below_n_equals_per_query_reference(kernel):
    z, x, y = data()
    f = sk.sparse_krr(z, x, y, k=7, kernel=kernel, lengthscale=0.9, ridge=1e-2, chunk_size=4)
    ref = reference_sparse(z, x, y, 7, kernel, 0.9, 1e-2)
    assert rel(f, ref) < 1e-10


def test_exact_krr_matches_sklearn_string_kernels():
    # Truly shared string kernels: sklearn's "rbf" is exp(-gamma ||a-b||^2), our gaussian with
    # gamma = 1/(2 l^2); "linear" is a.b in both. sklearn's "laplacian" is exp(-gamma ||a-b||_1) with
    # the L1 distance, NOT our (Euclidean) laplacian, so it is not compared here.
    from sklearn.kernel_ridge import KernelRidge
    z, x, y = data()
    ls, lam = 1.3, 1e-2
    for ours, theirs, params in [("gaussian", "rbf", {"gamma": 1 / (2 * ls ** 2)}), ("linear", "linear", {})]:
        skl = KernelRidge(alpha=lam, kernel=theirs, **params).fit(x.numpy(), y.numpy())
        expect = torch.from_numpy(skl.predict(z.numpy()))
        for f in (sk.exact_krr(z, x, y, kernel=ours, lengthscale=ls, ridge=lam),
                  sk.sparse_krr(z, x, y, k=10 ** 6, kernel=ours, lengthscale=ls, ridge=lam)):
            assert rel(f, expect) < 1e-8


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern32", "matern52", "imq"])
def test_exact_krr_matches_sklearn_gp_kernels(kernel):
    # The stationary kernels through sklearn's GP kernel objects and KernelRidge(kernel="precomputed"):
    # Matern(nu=0.5) = exp(-r/l) (our Euclidean laplacian), Matern(nu=1.5/2.5), RBF, and
    # RationalQuadratic(alpha=0.5) = (1 + r^2/l^2)^(-1/2) = our imq.
    from sklearn.gaussian_process import kernels as gpk
    from sklearn.kernel_ridge import KernelRidge
    ls, lam = 1.3, 1e-2
    gp = {"gaussian": gpk.RBF(ls), "laplacian": gpk.Matern(ls, nu=0.5), "matern32": gpk.Matern(ls, nu=1.5),
          "matern52": gpk.Matern(ls, nu=2.5), "imq": gpk.RationalQuadratic(ls, alpha=0.5)}[kernel]
    z, x, y = data()
    skl = KernelRidge(alpha=lam, kernel="precomputed").fit(gp(x.numpy()), y.numpy())
    expect = torch.from_numpy(skl.predict(gp(z.numpy(), x.numpy())))
    assert rel(sk.exact_krr(z, x, y, kernel=kernel, lengthscale=ls, ridge=lam), expect) < 1e-8
    assert rel(sk.sparse_krr(z, x, y, k=60, kernel=kernel, lengthscale=ls, ridge=lam), expect) < 1e-8


def test_shapes_dtypes_and_one_dimensional_targets():
    z, x, y = data(dtype=torch.float32)
    f = sk.sparse_krr(z, x, y[:, 0], k=5)
    assert f.shape == (25,) and f.dtype == torch.float32
    g = sk.exact_krr(z, x, y[:, 0])
    assert g.shape == (25,) and g.dtype == torch.float32
    assert sk.sparse_krr(z[:0], x, y, k=5).shape == (0, 3)
    f64 = sk.sparse_krr(z.double(), x.double(), y.double(), k=5, lengthscale=0.8)
    f32 = sk.sparse_krr(z, x, y, k=5, lengthscale=0.8, solve_dtype=torch.float64)
    assert f32.dtype == torch.float32 and rel(f32.double(), f64) < 1e-5


def test_tensor_hyperparameters_and_auto_lengthscale():
    z, x, y = data()
    ls = torch.tensor(0.9, dtype=torch.float64)
    lam = torch.tensor(1e-2, dtype=torch.float64)
    assert torch.allclose(sk.sparse_krr(z, x, y, k=7, lengthscale=ls, ridge=lam),
                          sk.sparse_krr(z, x, y, k=7, lengthscale=0.9, ridge=1e-2))
    auto = sk.auto_lengthscale(x, k=7)
    assert torch.allclose(sk.sparse_krr(z, x, y, k=7, lengthscale="auto"),
                          sk.sparse_krr(z, x, y, k=7, lengthscale=auto))


def test_precomputed_indices_reuse_one_search():
    z, x, y = data()
    _, idx = sk.knn_search(z, x, 16)
    for k in (3, 8, 16):
        assert torch.equal(sk.sparse_krr(z, x, y, k=k, indices=idx), sk.sparse_krr(z, x, y, k=k))
    with pytest.raises(ValueError, match="columns"):
        sk.sparse_krr(z, x, y, k=17, indices=idx)
    with pytest.raises(ValueError, match="out of range"):
        sk.sparse_krr(z, x, y, k=3, indices=idx + 100)
    with pytest.raises(ValueError, match="shape"):
        sk.sparse_krr(z, x, y, k=3, indices=idx[:3])


def test_duplicated_support_point_with_zero_ridge_is_finite():
    z, x, y = data(n=20)
    x = torch.cat([x, x[:5], x[:5]])          # every one of the first five points three times
    y = torch.cat([y, y[:5], y[:5]])
    z = torch.cat([z, x[:5]])                  # queries on top of the duplicates
    for kernel in KERNELS:
        for dtype in (torch.float64, torch.float32):
            f = sk.sparse_krr(z.to(dtype), x.to(dtype), y.to(dtype), k=8, kernel=kernel, ridge=0.0)
            assert torch.isfinite(f).all(), kernel
            g = sk.exact_krr(z.to(dtype), x.to(dtype), y.to(dtype), kernel=kernel, ridge=0.0)
            assert torch.isfinite(g).all(), kernel


def test_jittered_cholesky_and_clear_error():
    ones = torch.ones(3, 4, 4, dtype=torch.float64)            # rank one: singular
    ones[1] += torch.eye(4, dtype=torch.float64)                # this one is fine as it is
    factor = sk.robust_cholesky(ones)
    assert torch.isfinite(factor).all()
    assert torch.allclose(factor[1], torch.linalg.cholesky(ones[1]))
    with pytest.raises(sk.SingularSystemError, match="singular"):
        sk.robust_cholesky(-torch.eye(3, dtype=torch.float64))


BAD_INPUTS = [
    (dict(z=float("nan")), "z contains non-finite"),
    (dict(x=float("inf")), "x contains non-finite"),
    (dict(y=float("nan")), "y contains non-finite"),
    (dict(k=0), "k must be"),
    (dict(z_d=5), "feature size mismatch"),
    (dict(y_rows=10), "row mismatch"),
    (dict(empty=True), "empty support"),
    (dict(ridge=-1e-3), "negative ridge"),
    (dict(kernel="cauchy"), "unknown kernel"),
]


@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
@pytest.mark.parametrize("fn", ["sparse", "exact", "layer"])
def test_bad_inputs_raise_value_error(bad, message, fn):
    if fn == "exact" and "k" in bad:
        pytest.skip("exact_krr has no k")
    z, x, y = data()
    if "z" in bad:
        z = z.clone(); z[3, 1] = bad["z"]
    if "x" in bad:
        x = x.clone(); x[7, 0] = bad["x"]
    if "y" in bad:
        y = y.clone(); y[2, 2] = bad["y"]
    if "z_d" in bad:
        z = torch.randn(4, bad["z_d"], dtype=torch.float64)
    if "y_rows" in bad:
        y = y[:bad["y_rows"]]
    if bad.get("empty"):
        x, y = x[:0], y[:0]
    k = bad.get("k", 5)
    kernel = bad.get("kernel", "gaussian")
    ridge = bad.get("ridge", 1e-3)
    with pytest.raises(ValueError, match=message):
        if fn == "sparse":
            sk.sparse_krr(z, x, y, k=k, kernel=kernel, ridge=ridge)
        elif fn == "exact":
            sk.exact_krr(z, x, y, kernel=kernel, ridge=ridge)
        else:
            sk.SKLayer(k=k, kernel=kernel, ridge=ridge)(z, x, y)



@pytest.mark.parametrize("support", [False, True], ids=["tensor", "PrecomputedSupport"])
def test_finite_checks_read_the_search_norms_and_refuse_the_same_inputs(support):
    """The finite checks of z and x sum the squared norms the search computes anyway (one pass fewer over
    each): the same inputs pass and fail as with sums of the tensors themselves. A support point far
    enough for its squared norm to overflow float32 is still accepted and never a neighbour; a query whose
    squared norm overflows is refused by name (every distance to it is inf: before, a singular-system
    error about jitter)."""
    z, x, y = data(dtype=torch.float32)
    far = torch.cat([x, torch.tensor([[3e19, 0.0, 0.0, 0.0]])])
    yfar = torch.cat([y, torch.full((1, 3), 1e3)])
    support_of = (lambda t: sk.PrecomputedSupport(t)) if support else (lambda t: t)
    out = sk.sparse_krr(z, support_of(far), yfar, k=5, lengthscale=1.0)
    assert torch.equal(out, sk.sparse_krr(z, x, y, k=5, lengthscale=1.0))
    huge = z.clone()
    huge[2, 1] = 3e19
    with pytest.raises(ValueError, match="z has finite entries whose squares overflow"):
        sk.sparse_krr(huge, support_of(x), y, k=5, lengthscale=1.0)
    for name, t in (("z", z), ("x", x), ("y", y)):
        bad = t.clone()
        bad[1, 1] = float("nan")
        args = {"z": z, "x": x, "y": y, name: bad}
        if support and name == "x":
            continue                                # a support is checked when it is prepared
        with pytest.raises(ValueError, match=f"{name} contains non-finite"):
            sk.sparse_krr(args["z"], support_of(args["x"]), args["y"], k=5, lengthscale=1.0)


def test_bad_lengthscale_raises():
    z, x, y = data()
    for ls in (0.0, -1.0, float("nan"), "median"):
        with pytest.raises(ValueError, match="lengthscale"):
            sk.sparse_krr(z, x, y, k=5, lengthscale=ls)


def test_chunking_does_not_change_the_result():
    z, x, y = data(m=40)
    full = sk.sparse_krr(z, x, y, k=9, kernel="matern32")
    for chunk in (1, 7, 40, 1000):
        assert torch.allclose(sk.sparse_krr(z, x, y, k=9, kernel="matern32", chunk_size=chunk), full, atol=1e-12)
        assert torch.allclose(sk.exact_krr(z, x, y, kernel="matern32", chunk_size=chunk),
                              sk.exact_krr(z, x, y, kernel="matern32"), atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_matches_cpu(kernel):
    z, x, y = data()
    cpu = sk.sparse_krr(z, x, y, k=7, kernel=kernel)
    gpu = sk.sparse_krr(z.cuda(), x.cuda(), y.cuda(), k=7, kernel=kernel)
    assert gpu.device.type == "cuda" and rel(gpu.cpu(), cpu) < 1e-8
    assert rel(sk.exact_krr(z.cuda(), x.cuda(), y.cuda(), kernel=kernel).cpu(), sk.exact_krr(z, x, y, kernel=kernel)) < 1e-8


def test_serial_lapack_restores_the_thread_count():
    z, x, y = data()
    with _torch_threads(2):
        f = sk.sparse_krr(z, x, y, k=7)
        assert torch.get_num_threads() == 2
    assert torch.allclose(f, sk.sparse_krr(z, x, y, k=7), atol=1e-12)


# -- kernels given as instances, k of any integer type, chunk sizes -----------------------------------------
def test_kernel_instance_uses_its_own_lengthscale():
    z, x, y = data()
    inst = sk.Matern32(lengthscale=0.3)
    ls = float(inst.lengthscale)                  # 0.3 to float32 rounding (the instance stores log l)
    expect = sk.sparse_krr(z, x, y, k=7, kernel="matern32", lengthscale=ls)
    assert rel(sk.sparse_krr(z, x, y, k=7, kernel=inst), expect) < 1e-12
    assert rel(sk.sparse_krr(z, x, y, k=7, kernel=sk.Matern32, lengthscale=ls), expect) < 1e-12
    assert rel(expect, sk.sparse_krr(z, x, y, k=7, kernel="matern32")) > 1e-2   # not the default l = 1
    assert rel(sk.exact_krr(z, x, y, kernel=inst), sk.exact_krr(z, x, y, kernel="matern32", lengthscale=ls)) < 1e-12
    with pytest.raises(ValueError, match="carries its own lengthscale"):
        sk.sparse_krr(z, x, y, k=7, kernel=inst, lengthscale=1.0)
    with pytest.raises(ValueError, match="carries its own lengthscale"):
        sk.exact_krr(z, x, y, kernel=inst, lengthscale="auto")


def test_learnable_kernel_instance_gets_its_gradient():
    z, x, y = data()
    inst = sk.Gaussian(lengthscale=0.8, learn_lengthscale=True).double()
    sk.sparse_krr(z, x, y, k=7, kernel=inst).square().sum().backward()
    ls = torch.tensor(0.8, dtype=torch.float64).log().requires_grad_()
    sk.sparse_krr(z, x, y, k=7, lengthscale=ls.exp()).square().sum().backward()
    assert inst.log_lengthscale.grad is not None
    assert torch.allclose(inst.log_lengthscale.grad, ls.grad, rtol=1e-6)


def test_k_of_any_integer_type():
    np = pytest.importorskip("numpy")
    z, x, y = data()
    expect = sk.sparse_krr(z, x, y, k=7)
    for k in (np.int64(7), np.int32(7), np.uint8(7), torch.tensor(7)):
        assert torch.equal(sk.sparse_krr(z, x, y, k=k), expect), type(k)
        assert sk.SKLayer(x, y, k=k).k == 7
    assert torch.equal(sk.knn_search(z, x, np.int16(7))[1], sk.knn_search(z, x, 7)[1])
    for bad in (7.0, True, 0, np.int64(-1), "7", torch.tensor(7.0)):
        with pytest.raises(ValueError, match="k must be"):
            sk.sparse_krr(z, x, y, k=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, False])
def test_non_positive_chunk_size_is_a_value_error(bad):
    z, x, y = data()
    with pytest.raises(ValueError, match="chunk_size"):
        sk.sparse_krr(z, x, y, k=5, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        sk.exact_krr(z, x, y, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        sk.SKLayer(x, y, k=5, chunk_size=bad)


# -- the label path ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("continuous", [False, True], ids=["hard", "continuous"])
@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "linear"])
def test_label_path_equals_one_hot_path(kernel, continuous):
    z, x, _ = data(n=80, m=30, d=5)
    labels = torch.randint(0, 6, (80,), generator=torch.Generator().manual_seed(3))
    onehot = torch.nn.functional.one_hot(labels, 6).double()
    ridge = 0.5 if kernel == "linear" else 1e-2
    for chunk in (1, 7, None):
        a = sk.sparse_krr(z, x, onehot, k=9, kernel=kernel, lengthscale=1.3, ridge=ridge, continuous=continuous,
                          chunk_size=chunk)
        b = sk.sparse_krr(z, x, labels.int(), k=9, kernel=kernel, lengthscale=1.3, ridge=ridge,
                          continuous=continuous, chunk_size=chunk, num_classes=6)
        assert b.shape == (30, 6) and b.dtype == torch.float64
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), chunk
    assert torch.allclose(sk.exact_krr(z, x, labels, num_classes=6), sk.exact_krr(z, x, onehot), atol=1e-12)


def test_label_path_gradients_equal_one_hot_path():
    z, x, _ = data(n=60, m=12, d=4)
    labels = torch.arange(60) % 4
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    grads = []
    for y, c in ((onehot, None), (labels, 4)):
        zz, xx = z.clone().requires_grad_(), x.clone().requires_grad_()
        ls = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
        out = sk.sparse_krr(zz, xx, y, k=6, lengthscale=ls, ridge=1e-2, num_classes=c, chunk_size=5)
        grads.append(torch.autograd.grad(out.square().sum(), (zz, xx, ls)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_label_path_errors():
    z, x, _ = data()
    labels = torch.arange(60) % 3
    with pytest.raises(ValueError, match="num_classes"):
        sk.sparse_krr(z, x, labels, k=5)
    with pytest.raises(ValueError, match="out of range"):
        sk.sparse_krr(z, x, labels, k=5, num_classes=2)
    with pytest.raises(ValueError, match="out of range"):
        sk.sparse_krr(z, x, labels - 1, k=5, num_classes=3)
    with pytest.raises(ValueError, match="one-dimensional"):
        sk.sparse_krr(z, x, labels[:, None], k=5, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        sk.sparse_krr(z, x, torch.randn(60, 2, dtype=torch.float64), k=5, num_classes=3)


@contextmanager
def _torch_threads(n: int):
    """torch's thread count set to n inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_block_calls(gen, dtype, n: int, d: int, sizes, kernel: str, one_d: bool):
    """The calls of the one-block tests at one dtype: (z, support, targets, keywords) for each number of
    queries in ``sizes`` (the first query on support point 7), a plain and a prepared support of n points in
    d dimensions, the Gaussian, ``kernel`` with "auto" and the linear kernel, and (N, 2) targets, their first
    column as (N,) targets when ``one_d``, and labels of 4 classes."""
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = torch.randn(n, 2, generator=gen, dtype=dtype)
    labels = torch.randint(0, 4, (n,), generator=gen)
    targets = [(y, {})] + ([(y[:, 0], {})] if one_d else []) + [(labels, {"num_classes": 4})]
    for m in sizes:
        z = torch.randn(m, d, generator=gen, dtype=dtype)
        z[0] = x[7]
        for support in (x, sk.PrecomputedSupport(x)):
            for kw in ({}, {"kernel": kernel, "lengthscale": "auto"}, {"kernel": "linear"}):
                for t, extra in targets:
                    yield z, support, t, {**kw, **extra}


def test_the_one_block_path_gives_the_general_paths_numbers(monkeypatch):
    """A small no-graph CPU call runs ``_one_block_krr`` (one score block, one chunk, no layers); the same
    call forced through the general path (search, chunk runner) gives the same bits, on plain tensors and
    prepared supports, targets and labels, float32 and float64, 1 or 2 threads, a query on a support point,
    and where the one-block path hands the call back (a factorisation that fails without jitter)."""
    import sk.krr as krr

    taken = []
    one_block = krr._one_block_krr
    monkeypatch.setattr(krr, "_one_block_krr", lambda *a: taken.append(1) or one_block(*a))

    def both(*args, **kw):
        with torch.no_grad():
            fast = sk.sparse_krr(*args, **kw)
            with monkeypatch.context() as m:
                m.setattr(krr, "_fits_one_block", lambda *a: False)
                slow = sk.sparse_krr(*args, **kw)
        return fast, slow

    g = torch.Generator().manual_seed(3)
    for dtype, threads in ((torch.float32, 1), (torch.float64, 2)):
        with _torch_threads(threads):
            for z, support, targets, kw in _one_block_calls(g, dtype, 80, 6, (1, 2, 3, 40), "laplacian", True):
                fast, slow = both(z, support, targets, k=6, **kw)
                assert torch.equal(fast, slow) and fast.dtype == dtype, (z.shape, kw)
    assert taken                                                   # the path ran
    # A linear kernel on 3 features with 8 neighbours and no ridge: every local system is singular, the
    # one-block path hands the call back, and the general path's jitter solves it.
    x3, y3 = torch.randn(80, 3, generator=g), torch.randn(80, 2, generator=g)
    taken.clear()
    with monkeypatch.context() as m:
        returned = []
        m.setattr(krr, "_one_block_krr", lambda *a: returned.append(one_block(*a)) or returned[-1])
        fast, slow = both(torch.randn(5, 3, generator=g), x3, y3, k=8, kernel="linear", ridge=0.0)
    assert returned == [None] and torch.equal(fast, slow) and torch.isfinite(fast).all()


def test_the_one_block_path_gives_the_general_paths_graph_to_the_queries(monkeypatch):
    """Queries that need a gradient against a fixed support (an RL head's training step) take the one-block
    path too: the outputs, the gradients to z (``backward`` and second order through ``create_graph``) and
    the saved tensors a hook sees are those of the same call forced through the general path; a call where
    x, y or a hyperparameter needs a gradient does not take it."""
    import sk.krr as krr

    taken = []
    one_block = krr._one_block_krr
    monkeypatch.setattr(krr, "_one_block_krr", lambda *a: taken.append(1) or one_block(*a))

    def run(z0, support, targets, general, **kw):
        z = z0.clone().requires_grad_()
        saved = []
        with monkeypatch.context() as m:
            if general:
                m.setattr(krr, "_fits_one_block", lambda *a: False)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
                f = sk.sparse_krr(z, support, targets, k=6, **kw)
        (g,) = torch.autograd.grad((f * f).sum(), z, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), z)
        return f.detach(), g.detach(), h, sorted(saved)

    gen = torch.Generator().manual_seed(5)
    for dtype, threads in ((torch.float32, 1), (torch.float64, 2)):
        with _torch_threads(threads):
            for z, support, targets, kw in _one_block_calls(gen, dtype, 60, 5, (1, 7), "matern52", False):
                taken.clear()
                fast = run(z, support, targets, False, **kw)
                assert taken, (z.shape, kw)
                slow = run(z, support, targets, True, **kw)
                for a, b in zip(fast[:3], slow[:3]):
                    assert torch.equal(a, b), (z.shape, kw)
                assert fast[3] == slow[3]
    x, y = torch.randn(60, 5, generator=gen), torch.randn(60, 3, generator=gen)
    z = torch.randn(4, 5, generator=gen, requires_grad=True)
    for args, kw in (((z, x.requires_grad_(), y), {}), ((z, x.detach(), y.requires_grad_()), {}),
                     ((z, x.detach(), y.detach()), {"ridge": torch.tensor(1e-3, requires_grad=True)})):
        taken.clear()
        sk.sparse_krr(*args, k=6, **kw).sum().backward()
        assert not taken, kw
