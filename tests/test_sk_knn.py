"""sk.knn_search (torch brute force, faiss), ties, weighted k-NN and the auto lengthscale."""
import pytest
import torch

import sk


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_knn(z, x, k):
    d2 = ((z.double()[:, None, :] - x.double()[None, :, :]) ** 2).sum(-1)
    vals, idx = torch.sort(d2, dim=1, stable=True)
    return vals[:, :k], idx[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_torch_search_matches_reference(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g).to(dtype)
    z = torch.randn(50, 8, generator=g).to(dtype)
    d2, idx = sk.knn_search(z, x, 10, chunk_size=chunk_size)
    rd2, ridx = reference_knn(z, x, 10)
    assert torch.equal(idx, ridx)
    assert d2.dtype == dtype and torch.allclose(d2.double(), rd2, rtol=1e-4, atol=1e-4)
    assert not d2.requires_grad


def test_k_at_least_n_returns_everything_sorted():
    x = torch.randn(5, 3)
    d2, idx = sk.knn_search(torch.randn(4, 3), x, 50)
    assert idx.shape == (4, 5) and (d2[:, 1:] >= d2[:, :-1]).all()
    assert torch.equal(idx.sort(1).values, torch.arange(5).expand(4, 5))


def test_ties_go_to_the_lower_index():
    # The 8 corners of the unit cube, shuffled, each twice: all 16 points are equidistant from the
    # centre (in exact binary arithmetic), so the k nearest must be the k lowest indices.
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32)
    x = torch.cat([corners[torch.randperm(8, generator=torch.Generator().manual_seed(1))], corners])
    z = torch.full((3, 3), 0.5)
    for k in (1, 3, 8, 11):
        _, idx = sk.knn_search(z, x, k)
        assert torch.equal(idx, torch.arange(k).expand(3, k)), k
    # A query on a corner: the corner's two copies first (lower index first), then ties by index.
    _, idx = sk.knn_search(x[3:4], x, 5)
    twin = 8 + int(torch.nonzero((corners == x[3]).all(1)))
    assert idx[0, :2].tolist() == [3, twin]


def test_search_carries_no_gradient():
    z = torch.randn(4, 3, requires_grad=True)
    d2, idx = sk.knn_search(z, torch.randn(10, 3), 3)
    assert not d2.requires_grad and idx.dtype == torch.long


def test_bad_search_arguments():
    with pytest.raises(ValueError, match="k must be"):
        sk.knn_search(torch.randn(2, 3), torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="feature size mismatch"):
        sk.knn_search(torch.randn(2, 3), torch.randn(5, 4), 2)
    with pytest.raises(ValueError, match="empty support"):
        sk.knn_search(torch.randn(2, 3), torch.randn(0, 3), 2)
    with pytest.raises(ValueError, match="unknown backend"):
        sk.knn_search(torch.randn(2, 3), torch.randn(5, 3), 2, backend="annoy")


def test_faiss_backends_agree_with_torch():
    pytest.importorskip("faiss", reason="faiss is not installed (optional backend)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    z = torch.randn(100, 16, generator=g)
    d2, idx = sk.knn_search(z, x, 10)
    fd2, fidx = sk.knn_search(z, x, 10, backend="faiss")
    assert torch.equal(fidx, idx)
    assert torch.allclose(fd2, d2, rtol=1e-4, atol=1e-4)
    # IVF is approximate: with every cell probed it is exact, with the default it finds most.
    _, all_cells = sk.knn_search(z, x, 10, backend="faiss-ivf", nlist=16, nprobe=16)
    assert torch.equal(all_cells, idx)
    _, ivf = sk.knn_search(z, x, 10, backend="faiss-ivf")
    recall = (ivf[:, :, None] == idx[:, None, :]).any(2).float().mean()
    assert recall > 0.5
    y = torch.randn(2000, 2, generator=g)
    assert torch.equal(sk.sparse_krr(z, x, y, k=10, backend="faiss"), sk.sparse_krr(z, x, y, k=10))


def test_faiss_ties_go_to_the_lower_index():
    pytest.importorskip("faiss", reason="faiss is not installed (optional backend)")
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32)
    x = torch.cat([corners, corners])
    _, idx = sk.knn_search(torch.full((2, 3), 0.5), x, 5, backend="faiss")
    assert torch.equal(idx, torch.arange(5).expand(2, 5))


def dino_reference(z, x, labels, num_classes, k, t):
    zn, xn = torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(x, dim=1)
    sims, idx = (zn @ xn.T).topk(k, dim=1)
    one_hot = torch.nn.functional.one_hot(labels[idx], num_classes).float()
    return (one_hot * (sims / t).exp().unsqueeze(-1)).sum(1)


def test_weighted_knn_matches_dino():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(500, 12, generator=g), torch.randn(60, 12, generator=g)
    labels = torch.randint(0, 7, (500,), generator=g)
    scores = sk.weighted_knn(z, x, labels, 7, k=20, temperature=0.07, chunk_size=13)
    ref = dino_reference(z, x, labels, 7, 20, 0.07)
    assert scores.shape == (60, 7)
    assert torch.allclose(scores, ref, rtol=1e-4)


def test_auto_lengthscale_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64)
    d = torch.cdist(x, x)
    expect = d.sort(1).values[:, 7].median()      # column 0 is the point itself
    assert abs(sk.auto_lengthscale(x, k=7) - float(expect)) < 1e-9
    assert sk.auto_lengthscale(x[:1]) == 1.0
    assert sk.auto_lengthscale(torch.zeros(10, 3)) == 1.0
    sub = sk.auto_lengthscale(x, k=7, max_points=100)
    assert 0.7 * float(expect) < sub < 1.3 * float(expect)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_search_matches_cpu():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3000, 32, generator=g), torch.randn(200, 32, generator=g)
    d2, idx = sk.knn_search(z, x, 16)
    cd2, cidx = sk.knn_search(z.cuda(), x.cuda(), 16, chunk_size=64)
    assert cidx.device.type == "cuda" and torch.equal(cidx.cpu(), idx)
    scores = sk.weighted_knn(z.cuda(), x.cuda(), torch.arange(3000).cuda() % 5, 5)
    assert torch.allclose(scores.cpu(), sk.weighted_knn(z, x, torch.arange(3000) % 5, 5), rtol=1e-4)


def test_missing_faiss_gives_a_clear_import_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "faiss", None)     # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="faiss-cpu"):
        sk.knn_search(torch.randn(2, 3), torch.randn(5, 3), 2, backend="faiss")


def test_mixed_precision_inputs():
    """z and x of different floating dtypes meet in the wider one; the result has z's dtype."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g, dtype=torch.float64)
    z = torch.randn(5, 4, generator=g)
    f = sk.sparse_krr(z, x, y, k=4)
    assert f.dtype == torch.float32
    assert torch.allclose(f.double(), sk.sparse_krr(z.double(), x, y, k=4), rtol=1e-6, atol=1e-7)
    f = sk.sparse_krr(z, x.float(), y, k=4)      # y follows z
    assert f.dtype == torch.float32 and torch.isfinite(f).all()


def test_ties_at_every_chunk_boundary_resolved_after_the_loop():
    """Many rows with ties (duplicated support points, integer coordinates so that every score is exact
    whatever the matmul's summation order), searched one row per chunk and all at once: the lower index
    first, sorted, whatever the chunking (ties are fixed after the loop, not per chunk)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randint(-3, 4, (40, 5), generator=g).float()
    x = torch.cat([base, base, base[:10]])                     # every point twice, some three times
    z = torch.cat([base[:15], torch.randint(-3, 4, (10, 5), generator=g).float()])
    expect = reference_knn(z, x, 6)[1]
    for chunk in (1, 4, None):
        _, idx = sk.knn_search(z, x, 6, chunk_size=chunk)
        assert torch.equal(idx, expect), chunk


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_chunk_size_is_a_value_error(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        sk.knn_search(torch.randn(3, 2), torch.randn(9, 2), 2, chunk_size=bad)
