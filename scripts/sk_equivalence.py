"""Does this checkout's ``sk`` give the same bits as another commit's? (Records made by that commit then
stand for this code.)

    .venv/bin/python scripts/sk_equivalence.py --against 8677cfb          # the full sweep (12 min on 2 cores)
    .venv/bin/python scripts/sk_equivalence.py --against HEAD --quick     # a smoke run

The other commit's ``sk/`` is extracted with ``git archive`` into a temporary directory and imported under
another name. Both versions then run the same calls on the same seeded data: ``sk.sparse_krr`` on plain
tensors and on prepared supports (with and without stored distances), float targets, one-dimensional
targets and integer labels, several kernels, lengthscale ``"auto"``, chunking, a zero ridge and k = 1,
float32 and float64, 1 and 2 threads, and three ways of calling without a graph (``no_grad``,
``inference_mode``, a query that requires grad with grad mode off), then with a graph: the outputs and the
gradients of a loss to the queries. A call that raises must raise the same message in both. The run prints
each difference and exits with status 1 if there is any. Only the paths above are compared: a change
elsewhere (a new error for inputs that used to pass, exact KRR, the faiss backends) is not seen.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sk  # noqa: E402


def load_other(rev: str, into: Path):
    """``sk/`` at ``rev``, imported as the package ``sk_other``."""
    blob = subprocess.run(["git", "archive", rev, "sk"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    (into / "sk").rename(into / "sk_other")
    for name in [m for m in sys.modules if m == "sk_other" or m.startswith("sk_other.")]:
        del sys.modules[name]                                 # a previous call's copy
    sys.path.insert(0, str(into))
    return importlib.import_module("sk_other")


def run(mod, z, x, targets, support: str | None, ctx: str, kw: dict):
    """One call of ``mod.sparse_krr``: (output, gradient to z or None), or the error's text."""
    xs = x if support is None else mod.PrecomputedSupport(x, distances=support == "distances")
    zz = z.clone().requires_grad_() if ctx in ("grad_off", "graph") else z
    try:
        if ctx == "graph":
            out = mod.sparse_krr(zz, xs, targets, **kw)
            out.square().sum().backward()
            return out.detach(), zz.grad
        with torch.inference_mode() if ctx == "inference" else torch.no_grad():
            return mod.sparse_krr(zz, xs, targets, **kw), None
    except Exception as e:  # noqa: BLE001 - the message is what is compared
        return f"{type(e).__name__}: {e}"


def same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))


def sweep(other, quick: bool) -> tuple[int, list[str]]:
    g = torch.Generator().manual_seed(0)
    sizes = itertools.product((1, 3, 64) if quick else (1, 2, 3, 64, 700), (40, 300) if quick else (40, 300, 5000),
                              (8,) if quick else (8, 64), (torch.float32, torch.float64), (1,) if quick else (1, 2))
    options = [{}, {"num_classes": 5}, {"kernel": "laplacian"}, {"kernel": "linear"}, {"lengthscale": "auto"},
               {"one_dim": True}, {"chunk_size": 2}, {"ridge": 0.0}, {"k": 1}, {"continuous": True}]
    cases, diffs = 0, []
    before = torch.get_num_threads()
    try:
        for m, n, d, dtype, threads in sizes:
            torch.set_num_threads(threads)
            x = torch.randn(n, d, generator=g, dtype=dtype)
            y = torch.randn(n, 3, generator=g, dtype=dtype)
            labels = torch.randint(0, 5, (n,), generator=g)
            z = torch.randn(m, d, generator=g, dtype=dtype)
            if m >= 3:
                z[1] = x[5]                                   # a query on a support point
            for opt, support, ctx in itertools.product(options, (None, "plain", "distances"),
                                                       ("no_grad", "inference", "grad_off", "graph")):
                kw = dict(opt)
                one_dim = kw.pop("one_dim", False)
                kw.setdefault("k", 9)
                kw.setdefault("lengthscale", 1.3)
                targets = labels if "num_classes" in kw else (y[:, 0] if one_dim else y)
                a = run(sk, z, x, targets, support, ctx, kw)
                b = run(other, z, x, targets, support, ctx, kw)
                cases += 1
                if not same(a, b):
                    diffs.append(f"M={m} N={n} d={d} {dtype} threads={threads} {opt} support={support} {ctx}")
    finally:
        torch.set_num_threads(before)
    return cases, diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="a commit (or any git revision) whose sk/ to compare with")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep (a smoke run)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        other = load_other(args.against, Path(tmp))
        cases, diffs = sweep(other, args.quick)
    for line in diffs:
        print("differs:", line)
    print(f"sk here against sk at {args.against}: {cases} calls, {len(diffs)} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
