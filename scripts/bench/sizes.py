"""Sizes of every section, the full run's (``make bench-sk``) beside the quick run's (``--quick``, a smoke
test of the script); and the GPU section's (DEVICE_FULL on a GPU; DEVICE_QUICK with ``--quick`` or on
the CPU)."""

SIZES = {
    "ratio": dict(full=dict(M=4000, N=20000, d=256, k=32, classes=10, repeats=7),
                  quick=dict(M=200, N=1000, d=32, k=8, classes=5, repeats=2)),
    "matmul": dict(full=dict(n=2048, repeats=3), quick=dict(n=256, repeats=2)),
    "scaling": dict(full=dict(Ns=[5000, 10000, 20000], M=2000, d=8, k=32, lengthscale=0.5, ridge=1e-2, repeats=5,
                              sklearn_max_n=20000),
                    quick=dict(Ns=[250, 500, 1000], M=200, d=4, k=16, lengthscale=0.5, ridge=1e-2, repeats=1,
                               sklearn_max_n=1000)),
    "memory": dict(full=dict(M=50000, N=100000, d=64, k=16, classes=10),
                   quick=dict(M=2000, N=5000, d=16, k=8, classes=5)),
    "fashion": dict(full=dict(n_val=5000, n_support=None, n_test=None, ks=[8, 16, 32, 64, 128], mults=[0.5, 1.0, 2.0],
                              ridges=[1e-3, 1e-1], kernels=["gaussian", "laplacian"], exact_select_n=5000,
                              exact_n=20000, exact_mults=[0.5, 1.0, 2.0, 4.0], exact_ridges=[1e-3, 1e-1]),
                    quick=dict(n_val=300, n_support=2000, n_test=300, ks=[8, 16], mults=[1.0], ridges=[1e-1],
                               kernels=["gaussian"], exact_select_n=500, exact_n=1000, exact_mults=[1.0],
                               exact_ridges=[1e-1])),
    "classes": dict(full=dict(M=4000, N=20000, d=256, k=32, Cs=[10, 1000], repeats=5),
                    quick=dict(M=200, N=1000, d=32, k=8, Cs=[10, 1000], repeats=2)),
    "train": dict(full=dict(N=50000, d=256, batch=1024, k=32, classes=10, repeats=5),
                  quick=dict(N=2000, d=32, batch=128, k=8, classes=10, repeats=2)),
    # Section 7's shape is the target's shape (issue 18) in the quick run too: only the counts shrink.
    "small": dict(full=dict(N=256, d=256, k=16, c=2, batch=64, calls=200, repeats=7),
                  quick=dict(N=256, d=256, k=16, c=2, batch=64, calls=10, repeats=2)),
}
FULL = {name: both["full"] for name, both in SIZES.items()}
QUICK = {name: both["quick"] for name, both in SIZES.items()}

# The GPU section: (M queries, N support, d, k, C), the last the ImageNet k-NN evaluation shape (DINO: k=20).
DEVICE_FULL = dict(
    shapes=[(4000, 20000, 256, 32, 10), (50000, 200000, 256, 32, 10), (10000, 1281167, 384, 20, 1000)],
    repeats=7, vote_block_bytes=2 << 30, targets=[1.7, 1.15, 1.15], memory_target_gib=1.0,
    train=dict(N=50000, d=256, batch=1024, k=32, classes=10, repeats=7),
)
DEVICE_QUICK = dict(
    shapes=[(64, 500, 16, 8, 10), (200, 3000, 16, 8, 10), (100, 4000, 24, 6, 100)],
    repeats=2, vote_block_bytes=1 << 20, targets=[1.7, 1.15, 1.15], memory_target_gib=1.0,
    train=dict(N=2000, d=32, batch=128, k=8, classes=10, repeats=2),
)
