"""Memory budgets per device, host synchronisations per call (not per chunk), no copies of the support."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sk
from sk import budget

pytestmark = pytest.mark.usefixtures("one_thread")

MiB, GiB = 1 << 20, 1 << 30
CUDA = torch.device("cuda")     # only named: the budget functions are given the free memory


def test_cpu_budgets_are_the_measured_sizes():
    assert budget.search_block_bytes("cpu") == 64 * MiB
    assert budget.local_block_bytes("cpu") == 16 * MiB
    # 64 MiB of float32 scores at N = 20000: the 838-row blocks of results/bench_sk.md.
    assert budget.search_rows(4000, 20000, 4, torch.device("cpu")) == 838


@pytest.mark.parametrize("free,search,local", [
    (80 * GiB, 768 * MiB, 512 * MiB),        # a large card: the caps
    (1 * GiB, 256 * MiB, 256 * MiB),         # a quarter of what is free
    (100 * MiB, 64 * MiB, 25 * MiB),
    (40 * MiB, 64 * MiB, 16 * MiB),          # nearly full: never below the CPU sizes
])
def test_cuda_budgets_from_free_memory(free, search, local):
    assert budget.search_block_bytes(CUDA, free_bytes=free) == search
    assert budget.local_block_bytes(CUDA, free_bytes=free) == local


def test_rows_at_the_imagenet_shape_on_a_large_card():
    """10k queries against 1.28M support points, d=384, k=20, C=1000 (label path), on a card with 80 GiB
    free: 157-row score blocks (768 MiB) and all 10k points in one chunk of local solves."""
    n, d, k, c = 1281167, 384, 20, 1000
    rows = budget.search_rows(10000, n, 4, CUDA, free_bytes=80 * GiB)
    assert rows == 157 and rows * n * 4 <= 768 * MiB
    row_bytes = 4 * (k * (d + 4 * k + 1) + c)
    assert budget.local_rows(10000, row_bytes, CUDA, free_bytes=80 * GiB) == 10000
    # The CPU keeps its small blocks for the same problem.
    assert budget.search_rows(10000, n, 4, torch.device("cpu")) == 13


def test_override_applies_everywhere_and_is_restored():
    with sk.block_budget(search_bytes=3 * MiB, local_bytes=1 * MiB):
        assert budget.search_block_bytes("cpu") == 3 * MiB
        assert budget.search_block_bytes(CUDA, free_bytes=80 * GiB) == 3 * MiB
        assert budget.local_block_bytes(CUDA, free_bytes=80 * GiB) == 1 * MiB
    assert budget.search_block_bytes("cpu") == 64 * MiB
    previous = sk.set_block_budget(local_bytes=2 * MiB)
    try:
        assert budget.local_block_bytes("cpu") == 2 * MiB and budget.search_block_bytes("cpu") == 64 * MiB
    finally:
        sk.set_block_budget(**previous)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="bytes"):
            sk.set_block_budget(search_bytes=bad)


def test_environment_variables_set_the_budget():
    code = "import sk.budget as b; print(b.search_block_bytes('cpu'), b.local_block_bytes('cpu'))"
    env = {**os.environ, "SK_SEARCH_BLOCK_BYTES": "123456", "SK_LOCAL_BLOCK_BYTES": "7890"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["123456", "7890"]


def test_budgets_set_the_chunks_and_not_the_answer(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y, z = torch.randn(500, 16, generator=g), torch.randn(500, 3, generator=g), torch.randn(90, 16, generator=g)
    expect = sk.sparse_krr(z, x, y, k=8)
    counts = {"search": 0, "local": 0}
    scores, local = sk.knn._scores, sk.krr.local_solve

    def count(name, fn):
        def wrapper(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(sk.knn, "_scores", count("search", scores))
    monkeypatch.setattr(sk.krr, "local_solve", count("local", local))
    row_bytes = 4 * (8 * (16 + 4 * 8 + 3) + 3)
    with sk.block_budget(search_bytes=500 * 4 * 7, local_bytes=row_bytes * 11):
        out = sk.sparse_krr(z, x, y, k=8)
    assert counts == {"search": math.ceil(90 / 7), "local": math.ceil(90 / 11)}
    assert torch.allclose(out, expect, atol=1e-6)


class SyncCounter(TorchDispatchMode):
    """Counts the calls that read a tensor's value on the host (a synchronisation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(("_local_scalar_dense", "nonzero", "item")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> int:
    counter = SyncCounter()
    with counter:
        fn()
    return counter.count


@pytest.mark.parametrize("labels", [False, True], ids=["targets", "labels"])
def test_host_synchronisations_do_not_grow_with_the_number_of_chunks(labels):
    """The same number of host reads for 1 chunk and for 40 chunks of search and of local solves, with
    gradients, with ties in the search (duplicated support points) and with a precomputed search."""
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-2, 3, (100, 6), generator=g).float()
    x = torch.cat([base, base]).requires_grad_()
    z = torch.randn(40, 6, generator=g).requires_grad_()
    y = torch.arange(200) % 4 if labels else torch.randn(200, 4, generator=g)
    kw = dict(k=5, lengthscale=1.5, num_classes=4 if labels else None)

    def run(chunked):
        if chunked:
            with sk.block_budget(search_bytes=200 * 4):             # one query per search block
                return sk.sparse_krr(z, x, y, chunk_size=1, **kw)
        return sk.sparse_krr(z, x, y, **kw)

    few, many = count_syncs(lambda: run(False)), count_syncs(lambda: run(True))
    assert many == few and few <= 4
    assert count_syncs(lambda: run(True).sum().backward()) == few
    _, idx = sk.knn_search(z, x, 5)
    assert count_syncs(lambda: sk.sparse_krr(z, x, y, indices=idx, chunk_size=1, **kw)) == \
        count_syncs(lambda: sk.sparse_krr(z, x, y, indices=idx, **kw))


class LargestOutput(TorchDispatchMode):
    """The largest fresh allocation (an op's output that is not a view of an input) in elements."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in flat}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                if t.untyped_storage().nbytes() > self.largest * 4:
                    self.largest, self.op = t.untyped_storage().nbytes() // 4, func.__name__
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_no_copy_of_the_support_per_call(grad):
    """Neither the search nor the local solves (centring included) make a tensor the size of the support:
    the largest is a block of the support's squared norms (1 MiB), the score block (5 x N) or the gathered
    neighbours. The layer holds the given tensors unless asked to copy."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20000, 64, generator=g), torch.randn(20000, 2, generator=g)
    z = torch.randn(5, 64, generator=g).requires_grad_(grad)
    layer = sk.SKLayer(x, y, k=8, lengthscale=4.0)
    assert layer.representations.data_ptr() == x.data_ptr() and layer.targets.data_ptr() == y.data_ptr()
    copied = sk.SKLayer(x, y, k=8, copy=True)
    assert copied.representations.data_ptr() != x.data_ptr() and torch.equal(copied.representations, x)
    learned = sk.SKLayer(x, y, k=8, learn_representations=True)
    assert learned.representations.data_ptr() != x.data_ptr()       # an optimiser must not write into x
    mode = LargestOutput()
    with mode:
        out = layer(z)
        if grad:
            out.sum().backward()
    assert mode.largest <= x.numel() // 4, (mode.op, mode.largest)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budgets_and_synchronisations():
    """On a real card: budgets between the CPU sizes and the caps, and as many synchronising calls (torch's
    sync debug mode warns on each) for 1 chunk as for many."""
    import warnings
    assert budget.cuda_free_bytes(CUDA) > 0
    assert 64 * MiB <= budget.search_block_bytes(CUDA) <= 768 * MiB
    assert 16 * MiB <= budget.local_block_bytes(CUDA) <= 512 * MiB
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 16, generator=g).cuda()
    z = torch.randn(300, 16, generator=g).cuda().requires_grad_()
    labels = (torch.arange(2000) % 7).cuda()

    def warnings_of(fn):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return len(caught)

    def run(chunked):
        if chunked:
            with sk.block_budget(search_bytes=2000 * 4 * 3, local_bytes=64 * 1024):
                return sk.sparse_krr(z, x, labels, k=8, lengthscale=2.0, num_classes=7).sum().backward()
        return sk.sparse_krr(z, x, labels, k=8, lengthscale=2.0, num_classes=7).sum().backward()

    run(False)
    assert warnings_of(lambda: run(True)) == warnings_of(lambda: run(False))
