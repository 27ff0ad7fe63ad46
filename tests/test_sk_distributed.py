"""sk.distributed: SK over a support sharded across 2 gloo processes (spawned here, on the loopback address)
equals sk.sparse_krr in one process (values and gradients), and an SK head trains inside
DistributedDataParallel.

One module-scoped fixture starts the 2 processes once; each runs every case below and saves what it
computed; the tests compare those with the single-process answers computed here."""
import math
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sk
from sk.distributed import ShardedSupport

WORLD = 2
TIMEOUT_S = 120


# -- the cases: data known to every process ------------------------------------------------------------
def case_data(name):
    """(X (N, d), Y, Z (M, d), shard sizes, query counts, options) of a case, float64, from a fixed seed."""
    g = torch.Generator().manual_seed(len(name))      # a seed every process computes alike
    if name == "regression":       # uneven shards, rank 1's has fewer than k rows; learned x and y
        sizes, counts, d = [20, 3], [7, 4], 4
        y = torch.randn(sum(sizes), 2, generator=g, dtype=torch.float64)
        opts = dict(k=5, kernel="gaussian", lengthscale=1.3, ridge=0.1)
    elif name == "labels":         # integer labels; rank 0's shard has fewer than k rows
        sizes, counts, d = [3, 17], [5, 6], 3
        y = torch.randint(0, 4, (sum(sizes),), generator=g)
        opts = dict(k=6, kernel="laplacian", lengthscale=0.9, ridge=0.05, num_classes=4)
    else:                          # "empty": rank 0 holds no rows, rank 1 no queries; continuous SK
        sizes, counts, d = [0, 15], [6, 0], 3
        y = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
        opts = dict(k=4, kernel="matern52", lengthscale=1.1, ridge=0.1, continuous=True)
    x = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    z = torch.randn(sum(counts), d, generator=g, dtype=torch.float64)
    return x, y, z, sizes, counts, opts


CASES = ("regression", "labels", "empty")


def split(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def output_weights(shape):
    return torch.linspace(-1.0, 2.0, math.prod(shape), dtype=torch.float64).reshape(shape)


def run_case(name, rank):
    """This rank's sharded SK call, then backward of a weighted sum: outputs and gradients."""
    x, y, z, sizes, counts, opts = case_data(name)
    opts = dict(opts)
    num_classes = opts.pop("num_classes", None)
    xs = split(x, sizes, rank).clone().requires_grad_()
    ys = split(y, sizes, rank).clone()
    if ys.is_floating_point():
        ys.requires_grad_()
    zs = split(z, counts, rank).clone().requires_grad_()
    support = ShardedSupport(xs, ys, num_classes=num_classes)
    out = support.sparse_krr(zs, **opts)
    (out * output_weights(out.shape)).sum().backward()
    return dict(out=out.detach(), z=zs.grad, x=xs.grad, y=ys.grad if ys.requires_grad else None)


def run_index(rank):
    """The regression case with a fixed support searched by an IVF index per shard (every cell probed)."""
    x, y, z, sizes, counts, opts = case_data("regression")
    xs = split(x, sizes, rank)
    index = sk.SearchIndex(xs, "ivf", nlist=3, nprobe=3)
    zs = split(z, counts, rank).clone().requires_grad_()
    out = ShardedSupport(xs, split(y, sizes, rank), index=index).sparse_krr(zs, **opts)
    out.sum().backward()
    return dict(out=out.detach(), z=zs.grad)


def run_search(rank):
    """Ties across shards: the 8 cube corners twice (one copy per rank); the lower global index wins."""
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float64)
    shard = corners if rank == 0 else corners.flip(0)
    support = ShardedSupport(shard, torch.zeros(8, dtype=torch.float64))
    z = torch.full((2, 3), 0.5, dtype=torch.float64) if rank == 0 else corners[2:3]
    return support.search(z, 11)


def run_errors(rank):
    """Bad input on one rank: every rank must raise the same ValueError (no rank left in a collective)."""
    messages = {}
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    bad = {
        "d": (x if rank == 0 else torch.randn(5, 4, dtype=torch.float64), y, 3, None),
        "k": (x, y, 3 + rank, None),
        "num_classes": (x, torch.zeros(5, dtype=torch.long), 3, 2 + rank),
        "nan": (x if rank == 0 else torch.full((5, 3), float("nan"), dtype=torch.float64), y, 3, None),
    }
    for key, (xs, ys, k, num_classes) in bad.items():
        try:
            ShardedSupport(xs, ys, num_classes=num_classes).sparse_krr(xs[:2, :3], k=k, lengthscale=1.0)
            messages[key] = None
        except ValueError as err:
            messages[key] = str(err)
    return messages


def run_auto(rank):
    x, _, _, sizes, _, _ = case_data("labels")
    return ShardedSupport(split(x, sizes, rank), torch.zeros(sizes[rank])).auto_lengthscale(k=4, max_points=9)


# -- DistributedDataParallel with an SK head -----------------------------------------------------------
def make_model():
    torch.manual_seed(0)
    feats = torch.randn(24, 3, dtype=torch.float64)
    labels = torch.arange(24) % 3
    head = sk.SKClassifier(feats, labels, num_classes=3, k=6, lengthscale=1.0, ridge=0.1,
                           learn_representations=True, learn_targets=True)
    return torch.nn.Sequential(torch.nn.Linear(5, 3, dtype=torch.float64), head)


def ddp_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def run_ddp(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs, labels = ddp_batch(rank)
    torch.nn.functional.cross_entropy(model(inputs), labels).backward()
    grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    opt.step()
    if rank == 0:
        torch.save(model.module.state_dict(), out_dir / "ddp_checkpoint.pt")
    with torch.no_grad():
        after = model.module(ddp_batch(7)[0])
    return dict(grads=grads, params={n: p.detach().clone() for n, p in model.module.named_parameters()},
                after=after)


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: run_case(name, rank) for name in CASES}
        results["search"] = run_search(rank)
        results["index"] = run_index(rank)
        results["errors"] = run_errors(rank)
        results["auto"] = run_auto(rank)
        results["ddp"] = run_ddp(rank, out_dir)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Start 2 gloo processes once, wait for them (with a timeout), and load what each saved."""
    out_dir = tmp_path_factory.mktemp("sk_distributed")
    context = mp.start_processes(worker, args=(free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo processes did not finish within {TIMEOUT_S} s")
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return results, out_dir


# -- the tests -----------------------------------------------------------------------------------------
def single_process(name):
    """sk.sparse_krr on the concatenated support, every rank's queries at once, the same loss summed."""
    x, y, z, sizes, counts, opts = case_data(name)
    x, z = x.clone().requires_grad_(), z.clone().requires_grad_()
    y = y.clone().requires_grad_() if y.is_floating_point() else y
    out = sk.sparse_krr(z, x, y, **opts)
    loss = sum((split(out, counts, r) * output_weights(split(out, counts, r).shape)).sum() for r in range(WORLD))
    loss.backward()
    return out.detach(), z.grad, x.grad, (y.grad if y.requires_grad else None), sizes, counts


@pytest.mark.parametrize("name", CASES)
def test_sharded_equals_single_process(ranks, name):
    results, _ = ranks
    out, gz, gx, gy, sizes, counts = single_process(name)
    for r in range(WORLD):
        got = results[r][name]
        assert got["out"].shape == split(out, counts, r).shape
        torch.testing.assert_close(got["out"], split(out, counts, r), rtol=0, atol=1e-10)
        torch.testing.assert_close(got["z"], split(gz, counts, r), rtol=0, atol=1e-10)
        torch.testing.assert_close(got["x"], split(gx, sizes, r), rtol=0, atol=1e-10)
        if gy is not None:
            torch.testing.assert_close(got["y"], split(gy, sizes, r), rtol=0, atol=1e-10)
    assert float(gx.abs().sum()) > 0          # the comparison is not one of zeros


def test_sharded_support_with_an_index_per_shard(ranks):
    pytest.importorskip("faiss", reason="faiss is not installed (optional backend)")
    results, _ = ranks
    x, y, z, _, counts, opts = case_data("regression")
    z = z.clone().requires_grad_()
    out = sk.sparse_krr(z, x, y, **opts)
    out.sum().backward()
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["index"]["out"], split(out.detach(), counts, r), rtol=0, atol=1e-10)
        torch.testing.assert_close(results[r]["index"]["z"], split(z.grad, counts, r), rtol=0, atol=1e-10)


def test_sharded_search_breaks_ties_by_global_index(ranks):
    results, _ = ranks
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float64)
    bank = torch.cat([corners, corners.flip(0)])
    queries = [torch.full((2, 3), 0.5, dtype=torch.float64), corners[2:3]]
    for r in range(WORLD):
        d2, idx = results[r]["search"]
        ed2, eidx = sk.knn_search(queries[r], bank, 11)
        assert torch.equal(idx, eidx)
        torch.testing.assert_close(d2, ed2)
    assert torch.equal(results[0]["search"][1][0], torch.arange(11))   # all 16 tie: the 11 lowest indices


def test_auto_lengthscale_over_the_shards(ranks):
    results, _ = ranks
    x = case_data("labels")[0]
    expect = sk.auto_lengthscale(x, k=4, max_points=9)
    assert results[0]["auto"] == results[1]["auto"] == pytest.approx(expect, rel=1e-12)


def test_bad_input_raises_the_same_error_on_every_rank(ranks):
    results, _ = ranks
    patterns = {"d": "feature size d", "k": "disagree on k", "num_classes": "disagree on num_classes",
                "nan": "rank 1: .*non-finite"}
    for key, pattern in patterns.items():
        for r in range(WORLD):
            message = results[r]["errors"][key]
            assert message is not None and re.search(pattern, message), (key, r, message)


def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="process group"):
        ShardedSupport(torch.randn(4, 2), torch.randn(4))


def test_ddp_with_an_sk_head_trains_and_checkpoints(ranks):
    results, out_dir = ranks
    # The reference: each rank's gradient computed alone, averaged (what DDP's all-reduce must give).
    per_rank = []
    for r in range(WORLD):
        model = make_model()
        inputs, labels = ddp_batch(r)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        per_rank.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in per_rank[0]:
        mean = sum(g[name] for g in per_rank) / WORLD
        for r in range(WORLD):
            torch.testing.assert_close(results[r]["ddp"]["grads"][name], mean, rtol=1e-10, atol=1e-12)
    learned = "1.representations"
    assert float(per_rank[0][learned].abs().sum()) > 0 and float(per_rank[1][learned].abs().sum()) > 0
    assert not torch.allclose(per_rank[0][learned], per_rank[1][learned])   # averaging changes something
    for name, value in results[0]["ddp"]["params"].items():
        torch.testing.assert_close(results[1]["ddp"]["params"][name], value, rtol=0, atol=0)
    assert not torch.equal(results[0]["ddp"]["params"][learned], make_model()[1].representations.detach())
    # The checkpoint written by rank 0 restores the trained model in a fresh process.
    restored = make_model()
    restored.load_state_dict(torch.load(out_dir / "ddp_checkpoint.pt"))
    with torch.no_grad():
        torch.testing.assert_close(restored(ddp_batch(7)[0]), results[0]["ddp"]["after"], rtol=0, atol=0)


@pytest.mark.slow
def test_ddp_example_runs_with_torchrun():
    """examples/ddp_sk_head.py on 2 CPU processes (gloo), as the docs show it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "examples" / "ddp_sk_head.py"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), gloo" in proc.stdout and "max difference 0" in proc.stdout
    assert "sharded over 2 rank(s)" in proc.stdout
