"""sk.SearchIndex (faiss flat, IVF, HNSW built once), its measured recall, and knn_search's faiss backends
that keep their index between calls instead of rebuilding (IVF: retraining) it on every call."""
import gc

import pytest
import torch

import sk

faiss = pytest.importorskip("faiss", reason="faiss is not installed (optional backend)")
pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n=3000, m=200, d=16, seed=0):
    """Points in 30 tight clusters (where an inverted file is meant to work), and queries drawn alike."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, d, generator=g) * 4
    x = centres[torch.randint(0, 30, (n,), generator=g)] + torch.randn(n, d, generator=g)
    z = centres[torch.randint(0, 30, (m,), generator=g)] + torch.randn(m, d, generator=g)
    return x, z


def test_flat_index_is_the_exact_search():
    g = torch.Generator().manual_seed(0)      # unit-scale data: faiss's and torch's float32 scores agree
    x, z = torch.randn(2000, 16, generator=g), torch.randn(100, 16, generator=g)
    index = sk.SearchIndex(x, "flat")
    d2, idx = index.search(z, 10)
    ed2, eidx = sk.knn_search(z, x, 10)
    assert torch.equal(idx, eidx)
    torch.testing.assert_close(d2, ed2, rtol=1e-4, atol=1e-3)
    assert index.recall(z, 10) == 1.0


def test_flat_index_ties_go_to_the_lower_index():
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32)
    x = torch.cat([corners.flip(0), corners])
    _, idx = sk.SearchIndex(x, "flat").search(torch.full((2, 3), 0.5), 5)
    assert torch.equal(idx, torch.arange(5).expand(2, 5))


def test_ivf_recall_is_measured_and_probing_every_cell_is_exact():
    x, z = clustered()
    index = sk.SearchIndex(x, "ivf", nlist=32, nprobe=1)
    _, exact = sk.knn_search(z, x, 10)
    _, every_cell = index.search(z, 10, nprobe=32)
    assert sk.recall_at_k(every_cell, exact) == 1.0
    _, one_cell = index.search(z, 10)
    manual = (one_cell[:, :, None] == exact[:, None, :]).any(2).float().mean().item()
    assert index.recall(z, 10) == pytest.approx(manual)
    assert sk.recall_at_k(one_cell, exact) == pytest.approx(manual)
    assert manual < 1.0          # one cell of 32 misses neighbours: the recall is not assumed to be 1


def test_hnsw_recall_against_the_exact_search():
    x, z = clustered()
    index = sk.SearchIndex(x, "hnsw", hnsw_m=16, ef_construction=64)
    _, exact = sk.knn_search(z, x, 10)
    _, found = index.search(z, 10, ef_search=256)
    assert sk.recall_at_k(found, exact) >= 0.98
    d2, _ = index.search(z, 10, ef_search=256)
    assert (d2[:, 1:] >= d2[:, :-1]).all()                       # sorted by distance


class CountingIVF:
    """Stands in for faiss.IndexIVFFlat and counts how many IVF indexes are built (and trained)."""

    built = 0

    def __new__(cls, *args):
        CountingIVF.built += 1
        return CountingIVF.real(*args)


def test_knn_search_faiss_ivf_builds_its_index_once_per_support(monkeypatch):
    CountingIVF.real, CountingIVF.built = faiss.IndexIVFFlat, 0
    monkeypatch.setattr(faiss, "IndexIVFFlat", CountingIVF)
    x, z = clustered()
    first = sk.knn_search(z, x, 10, backend="faiss-ivf", nlist=16)
    second = sk.knn_search(z, x, 10, backend="faiss-ivf", nlist=16)
    sk.knn_search(z, x, 10, backend="faiss-ivf", nlist=16, nprobe=16)   # another probe setting, same index
    assert CountingIVF.built == 1
    assert torch.equal(first[1], second[1])
    x.mul_(2.0)                                                     # an in-place change: a new index
    _, idx = sk.knn_search(z * 2.0, x, 10, backend="faiss-ivf", nlist=16, nprobe=16)
    assert CountingIVF.built == 2
    assert sk.recall_at_k(idx, sk.knn_search(z * 2.0, x, 10)[1]) == 1.0     # searched the changed x
    sk.knn_search(z, x, 10, backend="faiss-ivf", nlist=8)               # another nlist: another index
    assert CountingIVF.built == 3
    support = sk.PrecomputedSupport(x, index="ivf")                      # one more, kept with the support
    y = torch.randn(len(x))
    first, second = sk.sparse_krr(z, support, y, k=5), sk.sparse_krr(z, support, y, k=5)
    assert CountingIVF.built == 4 and torch.equal(first, second)


def test_cached_index_goes_with_its_tensor():
    sk.index.clear_cache()
    x, z = clustered(n=500)
    sk.knn_search(z, x, 5, backend="faiss")
    assert len(sk.index._CACHE) == 1
    del x
    gc.collect()
    assert len(sk.index._CACHE) == 0


def test_index_of_a_changed_support_is_refused():
    x, z = clustered(n=500)
    index = sk.SearchIndex(x, "ivf", nlist=8)
    x.add_(1.0)
    with pytest.raises(ValueError, match="stale"):
        index.search(z, 5)


def test_bad_index_arguments():
    x, z = clustered(n=200)
    with pytest.raises(ValueError, match="unknown index kind"):
        sk.SearchIndex(x, "annoy")
    with pytest.raises(ValueError, match="empty"):
        sk.SearchIndex(x[:0], "flat")
    with pytest.raises(ValueError, match="nlist"):
        sk.SearchIndex(x, "ivf", nlist=0)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="gpu=True"):
            sk.SearchIndex(x, "ivf", gpu=True)
    with pytest.raises(ValueError, match="d=16"):
        sk.SearchIndex(x, "flat").search(z[:, :3], 5)


@pytest.mark.parametrize("distances", [False, True])
def test_precomputed_support_searches_with_its_index(distances):
    x, z = clustered(n=1500, d=8)
    x, z = x.double(), z.double()
    y = torch.randn(1500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    opts = dict(k=8, kernel="matern52", lengthscale=2.0, ridge=0.1)
    every_cell = sk.PrecomputedSupport(x, distances=distances, index=sk.SearchIndex(x, "ivf", nlist=16, nprobe=16))
    zg, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, ref = sk.sparse_krr(zg, every_cell, y, **opts), sk.sparse_krr(zr, x, y, **opts)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(zg.grad, zr.grad, rtol=1e-8, atol=1e-10)
    # One probed cell: the call follows the index's (approximate) neighbours.
    one_cell = sk.PrecomputedSupport(x, distances=distances, index=sk.SearchIndex(x, "ivf", nlist=16, nprobe=1))
    _, idx = one_cell.index.search(z, 8)
    torch.testing.assert_close(sk.sparse_krr(z, one_cell, y, **opts), sk.sparse_krr(z, x, y, indices=idx, **opts),
                               rtol=1e-8, atol=1e-10)


def test_precomputed_support_index_arguments_and_refresh():
    x, z = clustered(n=600)
    y = torch.randn(600)
    support = sk.PrecomputedSupport(x, index="flat")
    assert support.index.kind == "flat" and support.index.x is x
    with pytest.raises(ValueError, match="another tensor"):
        sk.PrecomputedSupport(x, index=sk.SearchIndex(x.clone(), "flat"))
    with pytest.raises(ValueError, match="index must be"):
        sk.PrecomputedSupport(x, index=3)
    x.data[:, 0] += torch.linspace(0.0, 30.0, 600)   # a write PyTorch does not count: refresh() rebuilds the index
    support.refresh()
    stale = sk.SearchIndex(x.clone(), "flat").search(z, 5)[1]
    assert torch.equal(support.index.search(z, 5)[1], stale)
    torch.testing.assert_close(sk.sparse_krr(z, support, y, k=5, lengthscale=3.0),
                               sk.sparse_krr(z, x, y, k=5, lengthscale=3.0))
