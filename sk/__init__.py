"""Sparse Kernels (SK): local, lazy, differentiable kernel ridge regression for PyTorch.

For each evaluation point, SK solves a k x k kernel ridge regression on its k nearest support points;
gradients reach the evaluation points, the support representations, the targets and the kernel's
hyperparameters. The package needs torch alone (numpy optional, faiss optional for the search).

    import sk
    f = sk.sparse_krr(z, x, y, k=32, kernel="gaussian", lengthscale=1.0, ridge=1e-3)
    g = sk.exact_krr(z, x, y, kernel="gaussian", lengthscale=1.0, ridge=1e-3)

    scores = sk.sparse_krr(z, x, labels, k=32, num_classes=1000)   # integer labels: no one-hot targets

See docs in each module: ``sk.kernels`` (formulas), ``sk.knn`` (search, weighted k-NN, auto
lengthscale), ``sk.linalg`` (jittered Cholesky, the local solves' own backward), ``sk.krr`` (functional
API, label path, continuous variant, numerics), ``sk.validation`` (input checks), ``sk.chunks`` (the chunk
runner and its threads), ``sk.modules`` (SKLayer, SKClassifier, save and load), ``sk.support`` (a fixed support prepared once
for many calls), ``sk.index`` (a faiss index built once: ``SearchIndex``), ``sk.bank`` (a support in a file
larger than memory: ``FileSupport``), ``sk.distributed`` (a support sharded across processes:
``ShardedSupport``, ``sharded_krr``), ``sk.budget`` (memory budgets
per device and their override), ``sk.precision`` (half precision, autocast) and ``sk.sklearn``
(scikit-learn estimators; imported on first use, it needs scikit-learn).
"""
from .budget import block_budget, set_block_budget
from .kernels import (IMQ, KERNELS, DotProductKernel, Gaussian, Kernel, Laplacian, Linear, Matern32, Matern52,
                      make_kernel, safe_norm_from_sq, sq_dists)
from .knn import BACKENDS, auto_lengthscale, knn_search, weighted_knn
from .krr import continuity_weights, exact_krr, sparse_krr
from .linalg import SingularSystemError, psd_solve, robust_cholesky
from .modules import SKClassifier, SKLayer
from .support import PrecomputedSupport
from .index import SearchIndex, recall_at_k
from .bank import FileSupport
from .distributed import ShardedSupport, sharded_krr

__version__ = "0.1.0"
__all__ = [
    "sparse_krr", "exact_krr", "knn_search", "weighted_knn", "auto_lengthscale",
    "SKLayer", "SKClassifier", "PrecomputedSupport",
    "Kernel", "DotProductKernel", "Gaussian", "Laplacian", "Matern32", "Matern52", "IMQ", "Linear", "KERNELS",
    "make_kernel",
    "BACKENDS", "SingularSystemError", "robust_cholesky", "psd_solve", "continuity_weights",
    "safe_norm_from_sq", "sq_dists", "block_budget", "set_block_budget",
    "SparseKernelRegressor", "SparseKernelClassifier",
    "SearchIndex", "recall_at_k", "FileSupport", "ShardedSupport", "sharded_krr",
]


def __getattr__(name: str):
    # The scikit-learn estimators import scikit-learn: only on first use, so sk imports with torch alone.
    if name in ("SparseKernelRegressor", "SparseKernelClassifier", "sklearn"):
        import importlib

        module = importlib.import_module(".sklearn", __name__)
        return module if name == "sklearn" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
