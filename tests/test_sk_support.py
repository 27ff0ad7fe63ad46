"""sk.PrecomputedSupport (a support prepared once for many calls) against the plain path, and the centring
outside the graph used when only the queries need a gradient."""
import pytest
import torch
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import sk
from sk import support as support_module

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = ["gaussian", "laplacian", "matern32", "matern52", "imq", "linear"]


def data(n=80, m=30, d=5, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return (torch.randn(m, d, generator=g, dtype=dtype), x, torch.randn(n, c, generator=g, dtype=dtype),
            torch.randint(0, 4, (n,), generator=g))


def leaves(z, y):
    return (z.clone().requires_grad_(), y.clone().requires_grad_(),
            torch.tensor(1.3, dtype=z.dtype, requires_grad=True), torch.tensor(0.05, dtype=z.dtype, requires_grad=True))


@pytest.mark.parametrize("distances", [False, True], ids=["local", "distances"])
@pytest.mark.parametrize("continuous", [False, True], ids=["hard", "continuous"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_equals_the_plain_path_with_gradients(kernel, continuous, distances):
    """Values and gradients to z, y, the lengthscale and the ridge, across several chunks."""
    z0, x, y0, _ = data()
    sup = sk.PrecomputedSupport(x, distances=distances)
    cot = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    results = []
    for xs, chunk in ((x, None), (sup, None), (sup, 7)):
        z, y, ls, lam = leaves(z0, y0)
        out = sk.sparse_krr(z, xs, y, k=6, kernel=kernel, lengthscale=ls, ridge=lam, continuous=continuous,
                            chunk_size=chunk)
        grads = torch.autograd.grad((out * cot).sum(), (z, y, ls, lam), allow_unused=True)
        results.append((out, grads))
    ref_out, ref_grads = results[0]
    for out, grads in results[1:]:
        assert torch.allclose(out, ref_out, atol=1e-10)
        for a, b in zip(grads, ref_grads):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("distances", [False, True], ids=["local", "distances"])
def test_labels_all_points_indices_one_dimensional_targets_and_half_precision(distances):
    z, x, y, labels = data()
    sup = sk.PrecomputedSupport(x, distances=distances)
    kw = dict(lengthscale=1.1, ridge=1e-2)
    assert torch.allclose(sk.sparse_krr(z, sup, labels, k=7, num_classes=4, **kw),
                          sk.sparse_krr(z, x, labels, k=7, num_classes=4, **kw), atol=1e-10)
    assert torch.allclose(sk.sparse_krr(z, sup, y, k=500, **kw), sk.exact_krr(z, x, y, **kw), atol=1e-9)
    _, idx = sk.knn_search(z, x, 9)
    assert torch.allclose(sk.sparse_krr(z, sup, y, k=9, indices=idx, **kw), sk.sparse_krr(z, x, y, k=9, **kw),
                          atol=1e-10)
    one = sk.sparse_krr(z, sup, y[:, 0], k=5, **kw)
    assert one.shape == (30,) and torch.allclose(one, sk.sparse_krr(z, x, y[:, 0], k=5, **kw), atol=1e-10)
    # float16 features: searched and solved in float32 (the support's dtype), returned in z's dtype
    zh, xh, yh = z.half(), x.half(), y.float()
    f = sk.sparse_krr(zh, sk.PrecomputedSupport(xh, distances=distances), yh, k=7, **kw)
    assert f.dtype == torch.float16
    assert torch.allclose(f.float(), sk.sparse_krr(zh, xh, yh, k=7, **kw).float(), atol=2e-3)
    # solve_dtype overrides the support's dtype for a call
    sup32 = sk.PrecomputedSupport(x.float(), distances=distances)
    f64 = sk.sparse_krr(z.float(), sup32, y.float(), k=7, solve_dtype=torch.float64, **kw)
    assert f64.dtype == torch.float32
    assert torch.allclose(f64.double(), sk.sparse_krr(z, x, y, k=7, **kw), atol=1e-5)


@pytest.mark.parametrize("distances", [False, True], ids=["local", "distances"])
def test_ties_go_to_the_lower_index(distances):
    """Duplicated points and a grid of integer points: exact ties of distances, as in sk.knn_search."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-2, 3, (40, 3), generator=g).double()
    x = torch.cat([base, base])                                      # every point twice
    z = torch.randint(-2, 3, (50, 3), generator=g).double() + 0.5    # equidistant from many grid points
    sup = sk.PrecomputedSupport(x, distances=distances)
    _, expect = sk.knn_search(z, x, 6)
    xs, sqn = sup.tensors(torch.float64)
    got, _ = sup.search(z, 6, 7, xs, sqn)                            # several score blocks
    assert torch.equal(got, expect)
    assert torch.equal(sup.search(z, 6, 1000, xs, sqn)[0], expect)   # one block
    y = torch.randn(80, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(sk.sparse_krr(z, sup, y, k=6, lengthscale=1.5, ridge=0.1),
                          sk.sparse_krr(z, x, y, k=6, lengthscale=1.5, ridge=0.1), atol=1e-10)


def test_distances_are_float64_accurate_for_a_tight_cloud():
    """The case that float32 distances got wrong: unit-norm features bunched at scales far below their
    norm (a Double DQN head, whose auto lengthscales were 0.02-0.09). The stored distances match exact
    differences to float32 rounding of each entry, where a float32 expansion is off by percents, and the
    local systems need no jitter."""
    g = torch.Generator().manual_seed(4)
    centre = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    x = torch.nn.functional.normalize(centre + 5e-4 * torch.randn(200, 64, generator=g), dim=1)
    sup = sk.PrecomputedSupport(x, distances=True)
    exact = ((x.double()[:, None] - x.double()[None]) ** 2).sum(-1)
    off = ~torch.eye(200, dtype=torch.bool)
    assert float(((sup.sq_dists.double() - exact).abs()[off] / exact[off]).max()) < 1e-5
    naive = (x * x).sum(1)[:, None] + (x * x).sum(1)[None] - 2 * x @ x.T      # what the distances are not
    assert float(((naive.double() - exact).abs()[off] / exact[off]).max()) > 1e-2
    z = torch.nn.functional.normalize(centre + 5e-4 * torch.randn(40, 64, generator=g), dim=1)
    y = torch.randn(200, 2, generator=g)
    ls = sk.auto_lengthscale(x, k=16)
    calls = []
    real = sk.krr.robust_cholesky

    def spy(a):
        calls.append(a.shape)
        return real(a)

    sk.krr.robust_cholesky = spy
    try:
        out = sk.sparse_krr(z, sup, y, k=16, lengthscale=ls, ridge=1e-3)
        plain = sk.sparse_krr(z, x, y, k=16, lengthscale=ls, ridge=1e-3)
    finally:
        sk.krr.robust_cholesky = real
    ref = sk.sparse_krr(z.double(), x.double(), y.double(), k=16, lengthscale=ls, ridge=1e-3)
    assert calls == []
    err, plain_err = float((out.double() - ref).abs().max()), float((plain.double() - ref).abs().max())
    assert err <= max(2 * plain_err, 1e-5 * float(ref.abs().max()))


def test_rejected_inputs():
    z, x, y, _ = data()
    with pytest.raises(ValueError, match="requires grad"):
        sk.PrecomputedSupport(x.clone().requires_grad_())
    with pytest.raises(ValueError, match="non-finite"):
        sk.PrecomputedSupport(torch.cat([x, torch.full((1, 5), float("nan"), dtype=x.dtype)]))
    with pytest.raises(ValueError, match="empty"):
        sk.PrecomputedSupport(x[:0])
    with pytest.raises(ValueError, match="2-D"):
        sk.PrecomputedSupport(x[0])
    with pytest.raises(TypeError):
        sk.PrecomputedSupport(x.numpy())
    sup = sk.PrecomputedSupport(x)
    with pytest.raises(ValueError, match="backend"):
        sk.sparse_krr(z, sup, y, k=5, backend="faiss")
    with pytest.raises(ValueError, match="non-finite"):
        sk.sparse_krr(torch.full_like(z, float("nan")), sup, y, k=5)
    with pytest.raises(ValueError, match="feature size"):
        sk.sparse_krr(z[:, :4], sup, y, k=5)
    with pytest.raises(ValueError, match="row mismatch"):
        sk.sparse_krr(z, sup, y[:10], k=5)
    x.add_(1.0)                                                      # the prepared copy is now stale
    with pytest.raises(ValueError, match="modified in place"):
        sk.sparse_krr(z, sup, y, k=5)


@pytest.mark.parametrize("coincide", [False, True], ids=["generic", "query-on-support"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_learned_queries_on_a_fixed_support(kernel, coincide):
    """The centring outside the graph (a fixed support, learned queries), for the plain tensor and a
    prepared support: exact gradients, finite at r = 0 (a query on a support point)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(14, 3, generator=g, dtype=torch.float64)
    y = torch.randn(14, 2, generator=g, dtype=torch.float64)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    if coincide:
        z[0], z[3] = x[4], x[9]
    _, idx = sk.knn_search(z, x, 5)
    supports = [x, sk.PrecomputedSupport(x)]
    if not (kernel == "laplacian" and coincide):
        # With stored distances the query distances come from float64 scores, whose rounding (1e-16) the
        # Laplacian turns into sqrt(1e-16) / l near r = 0: finite differences at 1e-6 see it (documented).
        supports.append(sk.PrecomputedSupport(x, distances=True))
    else:
        near = sk.sparse_krr(z, sk.PrecomputedSupport(x, distances=True), y, k=5, kernel=kernel, lengthscale=1.1,
                             ridge=0.05, indices=idx)
        assert torch.allclose(near, sk.sparse_krr(z, x, y, k=5, kernel=kernel, lengthscale=1.1, ridge=0.05,
                                                  indices=idx), atol=1e-7)
    for xs in supports:
        def f(zz, ls, xs=xs):
            return sk.sparse_krr(zz, xs, y, k=5, kernel=kernel, lengthscale=ls, ridge=0.05, indices=idx)

        inputs = (z.clone().requires_grad_(), torch.tensor(1.1, dtype=torch.float64, requires_grad=True))
        assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
        grads = torch.autograd.grad(f(*inputs).sum(), inputs, allow_unused=True)
        assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


def test_learned_queries_keep_the_gram_out_of_the_graph(monkeypatch):
    z, x, y, _ = data()
    used = []
    for name in ("local_offsets", "local_fixed_support"):
        real = getattr(sk.Gaussian, name).__func__

        def spy(cls, *a, name=name, real=real):
            used.append(name)
            return real(cls, *a)

        monkeypatch.setattr(sk.Gaussian, name, classmethod(spy))
    zg = z.clone().requires_grad_()
    sk.sparse_krr(zg, x, y, k=5)                                     # fixed support, learned queries
    sk.sparse_krr(z, x.clone().requires_grad_(), y, k=5)             # learned support
    with torch.no_grad():
        sk.sparse_krr(zg, x, y, k=5)                                 # no graph at all
    assert used == ["local_fixed_support", "local_offsets", "local_offsets"]


def test_k_smallest_selects_what_topk_selects():
    g = torch.Generator().manual_seed(6)
    for rows in (1, 31, 32, 100):
        scores = torch.randn(rows, 256, generator=g)
        v, i = support_module.k_smallest(scores, 17)
        tv, ti = torch.topk(scores, 17, dim=1, largest=False)
        assert torch.equal(v, tv) and torch.equal(i, ti)
    wide = torch.randn(40, support_module.NUMPY_SELECT_COLS + 1, generator=g)   # past the numpy limit
    assert torch.equal(support_module.k_smallest(wide, 5)[1], torch.topk(wide, 5, dim=1, largest=False).indices)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func.__name__.startswith(("_local_scalar_dense", "nonzero", "item"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("distances", [False, True], ids=["local", "distances"])
def test_a_one_query_call_is_a_few_dozen_operations(distances):
    """The cost of a tiny call is its count of tensor operations (each a few microseconds on the CPU): one
    query against 256 points is at most 45 of them (402 us and about 70 operations through a plain tensor
    before sk.PrecomputedSupport), with one host read for ties and one for failed factorisations beyond
    the input check's."""
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.normalize(torch.randn(256, 64, generator=g), dim=1)
    y = torch.randn(256, 2, generator=g)
    z = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    sup = sk.PrecomputedSupport(x, distances=distances)
    ls, lam = torch.tensor(0.5), torch.tensor(1e-3)
    with torch.no_grad():
        sk.sparse_krr(z, sup, y, k=16, lengthscale=ls, ridge=lam)
        counter = OpCounter()
        with counter:
            sk.sparse_krr(z, sup, y, k=16, lengthscale=ls, ridge=lam)
    assert counter.ops <= 45 and counter.reads <= 2


def test_layer_precompute_follows_its_support_and_round_trips():
    z, x, y, _ = data()
    plain = sk.SKLayer(x, y, k=6, lengthscale=1.2, ridge=1e-2)
    for mode in (True, "distances"):
        layer = sk.SKLayer(x.clone(), y, k=6, lengthscale=1.2, ridge=1e-2, precompute=mode)
        assert torch.allclose(layer(z), plain(z), atol=1e-10)
        prepared = layer._prepared[1]
        assert isinstance(prepared, sk.PrecomputedSupport) and prepared.has_distances == (mode == "distances")
        layer(z)
        assert layer._prepared[1] is prepared                        # cached while the support is unchanged
        layer.representations.mul_(2.0)                              # in place: the cache follows
        assert torch.allclose(layer(z), sk.sparse_krr(z, 2 * x, y, k=6, lengthscale=1.2, ridge=1e-2), atol=1e-10)
        zg = z.clone().requires_grad_()
        layer(zg).sum().backward()
        assert zg.grad is not None and torch.isfinite(zg.grad).all()
        fresh = sk.SKLayer()
        fresh.load_state_dict(layer.state_dict())
        assert fresh.precompute == mode and torch.allclose(fresh(z), layer(z), atol=1e-12)
    with pytest.raises(ValueError, match="precompute"):
        sk.SKLayer(x, y, precompute="yes")
    learned = sk.SKLayer(x, y, k=6, lengthscale=1.2, learn_representations=True, precompute=True)
    learned(z).sum().backward()                                      # a learned support: the plain path
    assert learned.representations.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_smallest_ordered_is_a_stable_sort_of_the_scores(dtype):
    """The key selection (float32 bits above the column) ranks as a stable sort: ties to the lower column,
    -0.0 equal to 0.0, rows wider than SORT_COLS (partitioned first) and blocks sliced into key blocks;
    float64 blocks whose kk + 1 smallest of a row round to one float32 are left to the caller (None)."""
    select = sk.select
    g = torch.Generator().manual_seed(8)
    cases = [torch.rand(64, 256, generator=g, dtype=dtype),
             torch.rand(3, select.SORT_COLS + 5, generator=g, dtype=dtype),
             torch.rand(select.KEY_BLOCK_ELEMENTS // 100 + 7, 100, generator=g, dtype=dtype)]
    for scores in cases:
        v, i = select.k_smallest_ordered(scores, 9)
        ref = torch.sort(scores, dim=1, stable=True)
        assert torch.equal(v, ref.values[:, :9]) and torch.equal(i, ref.indices[:, :9])
    tied = torch.randint(0, 5, (40, 300), generator=g).to(dtype)
    tied[0, 3], tied[0, 1] = -0.0, 0.0
    out = select.k_smallest_ordered(tied, 12)
    if dtype == torch.float64:
        assert out is None
    else:
        ref = torch.sort(tied, dim=1, stable=True)
        assert torch.equal(out[0], ref.values[:, :12]) and torch.equal(out[1], ref.indices[:, :12])
    # Blocks of a row or two: topk, and a stable sort where two of the kk + 1 smallest are equal.
    boundary = torch.rand(1, 300, generator=g, dtype=dtype)
    boundary[0, 200] = boundary[0].sort().values[11]                  # a tie at the kk-th place
    for few in (torch.randint(0, 5, (select.SORT_ROWS, 300), generator=g).to(dtype),
                torch.rand(select.SORT_ROWS, 300, generator=g, dtype=dtype), torch.rand(1, 300, generator=g),
                boundary):
        v, i = select.k_smallest_ordered(few, 12)
        ref = torch.sort(few, dim=1, stable=True)
        assert torch.equal(v, ref.values[:, :12]) and torch.equal(i, ref.indices[:, :12])
    assert select.k_smallest_ordered(torch.rand(4, 8), 8) is None                       # kk >= N
    assert select.k_smallest_ordered(torch.rand(4, 8, dtype=torch.float16), 3) is None


def test_a_small_call_reads_the_host_only_for_its_factorisations():
    """At the small-call shape (64 queries, 256 points) the search selects with ordered keys: no tie
    check, no host read, for the plain tensor and a PrecomputedSupport, ties included (duplicated points);
    the neighbours are those of the stable reference."""
    g = torch.Generator().manual_seed(9)
    base = torch.nn.functional.normalize(torch.randn(128, 32, generator=g), dim=1)
    x = torch.cat([base, base])                                                          # every point twice
    z = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    y = torch.randn(256, 2, generator=g)
    ref = torch.sort(((z.double()[:, None] - x.double()[None]) ** 2).sum(-1), dim=1, stable=True).indices[:, :16]
    assert torch.equal(sk.knn_search(z, x, 16)[1].sort(1).values, ref.sort(1).values)
    for xs in (x, sk.PrecomputedSupport(x)):
        with torch.no_grad():
            counter = OpCounter()
            with counter:
                sk.sparse_krr(z, xs, y, k=16, lengthscale=0.5, ridge=1e-3)
        assert counter.reads <= 2       # the input check's read and the factorisations' flag
