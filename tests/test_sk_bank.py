"""sk.FileSupport: a support read from a file a block of rows at a time equals the same support in memory
(search, SK, auto lengthscale), and its resident memory is bounded by the block budget, not by N."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import sk

pytestmark = pytest.mark.usefixtures("one_thread")


def bank(n=1000, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    x[700:705] = x[3:8]                   # duplicates in different blocks: ties across blocks
    z = torch.cat([torch.randn(40, d, generator=g).to(dtype), x[3:5]])
    return x, z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_search_equals_the_in_memory_search(tmp_path, dtype):
    x, z = bank(dtype=dtype)
    path = tmp_path / "bank.npy"
    np.save(path, x.numpy())
    support = sk.FileSupport(path, block_rows=97)          # 11 blocks, the last one short
    assert (support.n, support.d, support.dtype) == (1000, 8, dtype)
    for k in (1, 7, 1000, 5000):
        d2, idx = support.search(z, k)
        ed2, eidx = sk.knn_search(z, x, k)
        # The same neighbours at the same distances; the order of two of them can differ only where their
        # distances are equal once rounded (the blocks are merged by (distance, index)).
        assert torch.equal(idx.sort(1).values, eidx.sort(1).values), k
        torch.testing.assert_close(d2, ed2, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-4)
        steps = d2.diff(dim=1)
        assert bool((steps >= 0).all()) and bool((idx.diff(dim=1)[steps == 0] > 0).all()), k
    # A query equal to a duplicated row: both copies at distance 0, the lower index first.
    assert support.search(z[-2:-1], 2)[1].tolist() == [[3, 700]]


def test_raw_file_and_numpy_memmap(tmp_path):
    x, z = bank()
    raw = tmp_path / "bank.f32"
    raw.write_bytes(b"\0" * 16 + x.numpy().tobytes())
    expect = sk.knn_search(z, x, 5)[1]
    assert torch.equal(sk.FileSupport(raw, shape=(1000, 8), dtype=torch.float32, offset=16).search(z, 5)[1], expect)
    mapped = np.memmap(raw, dtype=np.float32, mode="r", offset=16, shape=(1000, 8))
    assert torch.equal(sk.FileSupport(mapped, block_rows=64).search(z, 5)[1], expect)
    rows = torch.tensor([999, 3, 4, 5, 700, 3])
    assert torch.equal(sk.FileSupport(mapped).rows(rows), x[rows])


def test_sparse_krr_equals_the_in_memory_call(tmp_path):
    x, z = bank(d=5)
    x, z = x.double(), z.double()
    path = tmp_path / "bank.npy"
    np.save(path, x.numpy())
    support = sk.FileSupport(path, block_rows=128)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (1000,), generator=g)
    zg = z.clone().requires_grad_()
    out = support.sparse_krr(zg, y, k=9, kernel="matern32", lengthscale=1.5, ridge=0.05)
    zr = z.clone().requires_grad_()
    ref = sk.sparse_krr(zr, x, y, k=9, kernel="matern32", lengthscale=1.5, ridge=0.05)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(zg.grad, zr.grad, rtol=0, atol=1e-12)
    scores = support.sparse_krr(z, labels, k=9, num_classes=6, lengthscale=1.5, continuous=True)
    torch.testing.assert_close(scores, sk.sparse_krr(z, x, labels, k=9, num_classes=6, lengthscale=1.5,
                                                     continuous=True), rtol=0, atol=1e-12)
    assert support.auto_lengthscale(k=8, max_points=50) == pytest.approx(sk.auto_lengthscale(x, k=8, max_points=50),
                                                                         rel=1e-12)
    with pytest.raises(ValueError, match="auto"):
        support.sparse_krr(z, y, k=9, lengthscale="auto")


def test_bad_files(tmp_path):
    x, _ = bank()
    with pytest.raises(ValueError, match="no such file"):
        sk.FileSupport(tmp_path / "missing.npy")
    raw = tmp_path / "bank.f32"
    raw.write_bytes(x.numpy().tobytes())
    with pytest.raises(ValueError, match="not a .npy"):
        sk.FileSupport(raw)
    with pytest.raises(ValueError, match="fewer than"):
        sk.FileSupport(raw, shape=(2000, 8), dtype=torch.float32)
    np.save(tmp_path / "ints.npy", np.arange(10).reshape(5, 2))
    with pytest.raises(ValueError, match="dtype"):
        sk.FileSupport(tmp_path / "ints.npy")
    with pytest.raises(ValueError, match="feature size"):
        sk.FileSupport(raw, shape=(1000, 8), dtype=torch.float32).search(torch.randn(2, 3), 3)


PEAK_PROBE = textwrap.dedent("""
    import re, sys, torch, sk
    torch.set_num_threads(1)
    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10
    budget, paths = int(sys.argv[1]), sys.argv[2:]
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    with sk.block_budget(search_bytes=budget):
        sk.FileSupport(paths[0]).search(z, 8)                   # first-use allocations before the baselines
        for path in paths:
            with open("/proc/self/clear_refs", "w") as f:        # restart the peak (VmHWM) from here
                f.write("5")
            base = status("VmRSS")
            d2, idx = sk.FileSupport(path).search(z, 8)
            print(status("VmHWM") - base, int(idx.max()))
""")


def write_bank(path, n, d=64):
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(n)
    for s in range(0, n, 65536):
        out[s:s + 65536] = rng.standard_normal((min(65536, n - s), d), dtype=np.float32)
    out.flush()


def test_resident_memory_is_bounded_by_the_block_budget(tmp_path):
    """Files of 32 and 128 MiB searched with a 2 MiB block budget: the search's peak resident memory does
    not grow with the file (a buffer of rows and one score block, reused), and stays far below its size."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak from a given moment")
    sizes = (1 << 17, 1 << 19)                           # rows of 64 float32: 32 MiB and 128 MiB
    paths = [tmp_path / f"bank{n}.npy" for n in sizes]
    for path, n in zip(paths, sizes):
        write_bank(path, n)
    budget = 2 << 20
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(budget), *map(str, paths)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (small, small_max), (large, large_max) = [tuple(map(int, line.split())) for line in proc.stdout.splitlines()]
    assert small_max > sizes[0] // 2 and large_max > sizes[1] // 2          # the whole files were searched
    grown = (sizes[1] - sizes[0]) * 64 * 4
    assert large < small + grown / 8, (small, large)        # 96 MiB more of file, a few MiB more of peak at most
    assert large < sizes[1] * 64 * 4 / 4, large
