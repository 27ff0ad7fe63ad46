"""No silent wrong answer (issue 18): each finding of a PyTorch user's walk outside the tested paths, one test
each. The thread and transform findings are covered cell by cell in tests/test_sk_transforms.py."""
import io
import re

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sk

pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=80, m=20, d=5, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype),
            torch.randn(n, c, generator=g, dtype=dtype))


class Recorder(TorchDispatchMode):
    """Every operation's name, the largest fresh output (elements), and the torch thread count it ran with."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.__name__, torch.get_num_threads()))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


# -- precision ------------------------------------------------------------------------------------------
def test_half_precision_auto_lengthscale_is_finite_and_equals_float32():
    """Squared distances of features of norm ~300 overflow float16 (65504): the rule is computed in float32."""
    z, x, y = data(n=200, dtype=torch.float32)
    xh = (300.0 * torch.nn.functional.normalize(x, dim=1)).half()
    auto = sk.auto_lengthscale(xh, k=8)
    assert np.isfinite(auto) and auto == pytest.approx(sk.auto_lengthscale(xh.float(), k=8), rel=1e-6)
    zh = (300.0 * torch.nn.functional.normalize(z, dim=1)).half()
    out = sk.sparse_krr(zh, xh, y, k=8, lengthscale="auto")
    expect = sk.sparse_krr(zh, xh, y, k=8, lengthscale=auto)
    assert torch.isfinite(out).all() and torch.equal(out, expect)


def test_reduced_precision_settings_change_neither_the_neighbours_nor_the_solves(monkeypatch):
    """``torch.set_float32_matmul_precision("high")`` (TF32 on a GPU, oneDNN's reduced passes on a CPU):
    inside SK's search, local solves and exact KRR the precision reads "highest", the results are the same
    bits, and the caller's setting is back after the call."""
    z, x, y = data(dtype=torch.float32)
    sup = sk.PrecomputedSupport(x, distances=True)
    seen = []

    def spy(module, name):
        real = getattr(module, name, None)
        if real is None:
            return

        def wrapper(*a, **kw):
            seen.append((name, torch.get_float32_matmul_precision()))
            return real(*a, **kw)
        monkeypatch.setattr(module, name, wrapper)

    spy(sk.knn, "_scores")
    spy(sk.krr, "local_solve")
    spy(sk.support, "_distance_block")
    spy(sk.krr, "_cross_block")
    calls = [lambda: sk.sparse_krr(z, x, y, k=7), lambda: sk.sparse_krr(z, sup, y, k=7),
             lambda: sk.exact_krr(z, x, y), lambda: sk.knn_search(z, x, 7)[1]]
    expect = [f() for f in calls]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        seen.clear()
        got = [f() for f in calls]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen and all(p == "highest" for _, p in seen), seen
    assert {name for name, _ in seen} == {"_scores", "local_solve", "_distance_block", "_cross_block"}
    assert all(torch.equal(a, b) for a, b in zip(got, expect))


def test_a_float64_query_against_a_float32_support_is_solved_in_float64():
    z, x, y = data()
    for distances in (False, True):
        out = sk.sparse_krr(z, sk.PrecomputedSupport(x.float(), distances=distances), y, k=6, lengthscale=1.2)
        plain = sk.sparse_krr(z, x.float(), y, k=6, lengthscale=1.2)
        assert out.dtype == torch.float64 and torch.allclose(out, plain, atol=1e-12), distances


# -- ties -------------------------------------------------------------------------------------------------
def test_among_equal_computed_distances_the_lower_index_wins():
    """||z||^2 = 2^24: the scores ||x_j||^2 - 2 z.x_j of x_0 = (0, 1) and x_1 = (0, 0) differ (1 and 0), but
    their computed float32 distances 2^24 + 1 and 2^24 are equal: the contract's tie, which x_0 wins."""
    z = torch.tensor([[4096.0, 0.0]])
    x = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    y = torch.tensor([[1.0], [-1.0], [5.0], [5.0]])
    d2, idx = sk.knn_search(z, x, 1)
    assert idx.tolist() == [[0]] and float(d2) == 2.0 ** 24
    assert sk.knn_search(z, x, 2)[1].tolist() == [[0, 1]]
    for xs in (x, sk.PrecomputedSupport(x)):
        assert float(sk.sparse_krr(z, xs, y, k=1, lengthscale=4096.0, ridge=1e-3)) > 0


# -- exact KRR --------------------------------------------------------------------------------------------
def test_k_at_least_n_with_auto_lengthscale_equals_exact_krr():
    z, x, y = data()
    for k in (80, 500):
        assert torch.allclose(sk.sparse_krr(z, x, y, k=k, lengthscale="auto"),
                              sk.exact_krr(z, x, y, lengthscale="auto"), atol=1e-9)


def test_exact_krr_keeps_no_kernel_block_for_backward_and_reads_the_host_once_per_call():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 4, generator=g, dtype=torch.float64), torch.randn(300, 2, generator=g, dtype=torch.float64)
    z = torch.randn(160, 4, generator=g, dtype=torch.float64)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    zg = z.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sk.exact_krr(zg, x, y, lengthscale=1.5, chunk_size=20)
    blocks = [s for s in saved if s >= 20 * 300]
    assert len(blocks) <= 3, f"{len(blocks)} saved tensors of a (chunk, N) block or more"   # the N x N system's
    grad, = torch.autograd.grad(out.sum(), zg)
    zr = z.clone().requires_grad_()
    ref, = torch.autograd.grad(sk.exact_krr(zr, x, y, lengthscale=1.5).sum(), zr)
    assert torch.allclose(grad, ref, atol=1e-10)
    reads = []
    for chunk in (160, 10):
        rec = Recorder()
        with rec:
            sk.exact_krr(z, x, y, lengthscale=1.5, chunk_size=chunk)
        reads.append(sum(name.startswith(("_local_scalar_dense", "nonzero", "item")) for name, _ in rec.ops))
    assert reads[0] == reads[1]


# -- memory bounds ----------------------------------------------------------------------------------------
def test_stored_distances_with_learned_queries_keep_the_backward_sparse_in_n():
    """The gradient to the queries goes through their k selected distances: nothing of size (M, N) is saved
    for backward or made by it."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3000, 6, generator=g, dtype=torch.float64), torch.randn(3000, 2, generator=g, dtype=torch.float64)
    z = torch.randn(64, 6, generator=g, dtype=torch.float64, requires_grad=True)
    sup = sk.PrecomputedSupport(x, distances=True)
    storages = {sup.x.untyped_storage().data_ptr()} | {t.untyped_storage().data_ptr() for t in sup.tensors(torch.float64)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in storages:          # the support's own tensors cost nothing
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sk.sparse_krr(z, sup, y, k=8, lengthscale=1.5)
    rec = Recorder()
    with rec:
        grad, = torch.autograd.grad(out.square().sum(), z)
    assert max(saved) < 64 * 3000 // 10 and rec.largest < 64 * 3000 // 10
    zr = z.detach().clone().requires_grad_()
    ref, = torch.autograd.grad(sk.sparse_krr(zr, x, y, k=8, lengthscale=1.5).square().sum(), zr)
    assert torch.allclose(grad, ref, atol=1e-9)


def test_weighted_knn_never_copies_the_support():
    g = torch.Generator().manual_seed(5)
    x, z = torch.randn(20000, 64, generator=g), torch.randn(5, 64, generator=g)
    labels = torch.randint(0, 7, (20000,), generator=g)
    rec = Recorder()
    with rec:
        scores = sk.weighted_knn(z, x, labels, 7, k=10)
    assert rec.largest <= x.numel() // 4
    xn, zn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(z, dim=1)
    sims, idx = (zn @ xn.T).topk(10, dim=1)
    ref = torch.zeros(5, 7).scatter_add(1, labels[idx], (sims / 0.07).exp())
    assert torch.allclose(scores, ref, rtol=1e-4)


def test_the_backward_of_the_small_solves_runs_on_one_thread():
    """The forward's batched factorisations and solves run on one thread (``serial_lapack``); so must their
    backward, where two threads made a batch of small solves far slower on a busy machine."""
    z, x, y = data(m=40)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for targets, c in ((y, None), (torch.arange(80) % 4, 4)):
            zz, xx = z.clone().requires_grad_(), x.clone().requires_grad_()
            out = sk.sparse_krr(zz, xx, targets, k=8, lengthscale=1.2, num_classes=c)
            rec = Recorder()
            with rec:
                out.square().sum().backward()
            lapack = [threads for name, threads in rec.ops if name.startswith(("linalg_", "cholesky"))]
            assert lapack and set(lapack) == {1}
    finally:
        torch.set_num_threads(before)


# -- the prepared support ---------------------------------------------------------------------------------
def test_a_write_the_version_counter_misses_is_taken_after_refresh():
    """``x.data.mul_(2)`` does not bump x's version counter: the support cannot see it (documented) and
    ``refresh()`` prepares it again, in place, for every holder; the layer's cache likewise."""
    z, x, y = data()
    for distances in (False, True):
        xs = x.clone()
        sup = sk.PrecomputedSupport(xs, distances=distances)
        xs.data.mul_(2.0)
        assert sup.refresh() is sup
        assert torch.allclose(sk.sparse_krr(z, sup, y, k=6, lengthscale=1.2), sk.sparse_krr(z, 2 * x, y, k=6, lengthscale=1.2),
                              atol=1e-10)
    layer = sk.SKLayer(x.clone(), y, k=6, lengthscale=1.2, precompute=True)
    layer(z)
    layer.representations.data.mul_(2.0)
    assert torch.allclose(layer.refresh()(z), sk.sparse_krr(z, 2 * x, y, k=6, lengthscale=1.2), atol=1e-10)


@pytest.mark.parametrize("precompute", [True, "distances"])
def test_a_layer_first_called_under_inference_mode_then_trains(precompute):
    """A float32 feature bank (its prepared float64 copy and table are made on the first call): a call under
    ``torch.inference_mode`` must not leave inference tensors that the next training call saves."""
    z, x, y = data(dtype=torch.float32)
    layer = sk.SKLayer(x, y, k=6, lengthscale=1.2, learn_lengthscale=True, learn_ridge=True, precompute=precompute)
    with torch.inference_mode():
        first = layer(z)
    zg = z.clone().requires_grad_()
    out = layer(zg)
    out.square().sum().backward()
    assert torch.allclose(out.detach(), first, rtol=1e-4, atol=1e-4)   # float32: two centrings of the neighbours
    assert zg.grad is not None and layer.kernel.log_lengthscale.grad is not None and layer.log_ridge.grad is not None


def test_the_prepared_supports_documented_attributes_exist():
    sup = sk.PrecomputedSupport(data()[1], distances=True)
    doc = sk.PrecomputedSupport.__doc__
    attributes = doc[doc.index("Attributes:"):].split("\n\n")[0]
    names = re.findall(r"``([a-z_]+)``", attributes)
    assert names and all(hasattr(sup, name) for name in names), [n for n in names if not hasattr(sup, n)]
    module_doc = sk.support.__doc__
    assert "centre" not in sk.PrecomputedSupport.__doc__ and r"\tilde" not in module_doc


# -- save and load ----------------------------------------------------------------------------------------
def round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_loading_never_writes_into_the_callers_tensors():
    z, x, y = data()
    feats, targets = x.clone(), y.clone()
    layer = sk.SKLayer(feats, targets, k=6, lengthscale=1.2)
    other = sk.SKLayer(x + 1.0, y - 1.0, k=6, lengthscale=0.8)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(feats, x) and torch.equal(targets, y)                      # the caller's bank is intact
    assert torch.equal(layer(z), other(z))


def test_a_users_kernel_class_is_restored_or_named():
    class Poly2(sk.DotProductKernel):
        name = "poly2"

        @staticmethod
        def k(inner, lengthscale):
            return (1.0 + inner / (lengthscale * lengthscale)) ** 2

    z, x, y = data()
    a = sk.SKLayer(x, y, k=6, kernel=Poly2(lengthscale=2.0), ridge=0.1)
    state = round_trip(a.state_dict())
    b = sk.SKLayer()
    b.load_state_dict(state)
    assert type(b.kernel) is Poly2 and torch.equal(b(z), a(z))
    state["_extra_state"] = {**state["_extra_state"], "kernel_class": "somewhere.Missing"}
    with pytest.raises(ValueError, match="somewhere.Missing"):
        sk.SKLayer().load_state_dict(state)


def test_a_bare_layer_round_trip_keeps_float64_hyperparameters():
    z, x, y = data()
    for learn in (False, True):
        a = sk.SKLayer(x, y, k=6, lengthscale=0.9, ridge=0.05, learn_lengthscale=learn, learn_ridge=learn).double()
        b = sk.SKLayer()
        b.load_state_dict(round_trip(a.state_dict()))
        assert b.kernel.log_lengthscale.dtype == b.ridge.dtype == torch.float64, learn
        assert torch.equal(b(z), a(z))


# -- scikit-learn -----------------------------------------------------------------------------------------
def test_classifier_predicts_the_best_score_and_its_probabilities_sum_to_one(monkeypatch):
    from sk.sklearn import SparseKernelClassifier
    g = np.random.default_rng(0)
    # A linear kernel on data away from the origin: queries on the other side score below 0 in every class.
    X, labels = 2 + g.normal(size=(120, 3)), g.integers(0, 4, 120)
    clf = SparseKernelClassifier(k=20, kernel="linear", ridge=1.0).fit(X, labels)
    queries = g.normal(size=(200, 3)) * 2
    scores = sk.sparse_krr(torch.tensor(queries), clf.support_, clf.labels_, k=20, kernel="linear", ridge=1.0,
                           num_classes=4).numpy()
    negative = scores.max(1) <= 0
    assert (scores[negative].argmax(1) != 0).any()                        # the case the clipped argmax got wrong
    assert np.array_equal(clf.predict(queries), clf.classes_[scores.argmax(1)])
    tiny = torch.full((3, 4), 5e-324, dtype=torch.float64)                # subnormal totals
    tiny[1, 2] = 0.0
    monkeypatch.setattr(clf, "_scores", lambda X, targets, num_classes=None: tiny.clone())
    proba = clf.predict_proba(queries[:3])
    assert np.allclose(proba.sum(1), 1.0) and np.allclose(proba[0], 0.25)
