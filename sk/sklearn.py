"""scikit-learn estimators around ``sk.sparse_krr``: ``SparseKernelRegressor``, ``SparseKernelClassifier``.

    from sk.sklearn import SparseKernelClassifier
    from sklearn.model_selection import GridSearchCV
    search = GridSearchCV(SparseKernelClassifier(), {"k": [8, 16, 32], "ridge": [1e-3, 1e-1]}, cv=5)
    search.fit(X, y).best_params_

They keep scikit-learn's estimator contract (``sklearn/utils/estimator_checks.py``): the constructor
stores its arguments as plain attributes and validates nothing; ``fit`` validates them and the data and
names what it learned with a trailing underscore; so ``clone``, ``get_params`` / ``set_params``,
``Pipeline`` and ``GridSearchCV`` work, and both pass ``parametrize_with_checks``. SK is lazy: ``fit``
keeps the training set as the support (``support_``, ``targets_`` / ``labels_``, torch tensors on
``device``) and resolves the lengthscale (``lengthscale_``, from ``"auto"`` = ``sk.auto_lengthscale``);
each ``predict`` runs the neighbour search and the local solves.

The computation runs in torch on ``device`` (``"cpu"``, ``"cuda"``, ...) in ``dtype`` (``"float64"``,
numpy's default, or ``"float32"``); predictions come back as numpy arrays. This module imports
scikit-learn (``import sk`` does not: ``sk.SparseKernelRegressor`` loads it on first use).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .kernels import kernel_class
from .knn import auto_lengthscale
from .krr import sparse_krr
from .validation import as_k, check_lengthscale, check_ridge, check_taper

__all__ = ["SparseKernelRegressor", "SparseKernelClassifier"]


class _SparseKernelBase(BaseEstimator):
    """Shared parameters, validation and the call of ``sk.sparse_krr``."""

    def __init__(self, k=32, kernel="gaussian", lengthscale="auto", ridge=1e-3, continuous=False, taper=0.5,
                 backend="torch", device="cpu", dtype="float64"):
        self.k = k
        self.kernel = kernel
        self.lengthscale = lengthscale
        self.ridge = ridge
        self.continuous = continuous
        self.taper = taper
        self.backend = backend
        self.device = device
        self.dtype = dtype

    def _check_params(self) -> None:
        as_k(self.k)
        kernel_class(self.kernel)
        check_ridge(self.ridge)
        if not (isinstance(self.lengthscale, str) and self.lengthscale == "auto"):
            check_lengthscale(self.lengthscale)
        check_taper(self.taper, self.continuous)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def _tensor(self, a) -> torch.Tensor:
        # torch.tensor copies: the caller's array (possibly a read-only memmap) is never shared.
        return torch.tensor(np.asarray(a), dtype=getattr(torch, self.dtype), device=self.device)

    def _fit_support(self, X) -> None:
        self._check_params()
        x = self._tensor(X)
        if getattr(self, "normalize", False):
            x = F.normalize(x, dim=1)
        self.support_ = x
        k = min(as_k(self.k), x.shape[0])
        self.lengthscale_ = (auto_lengthscale(x, k=k) if isinstance(self.lengthscale, str)
                             else float(self.lengthscale))

    def _scores(self, X, targets, num_classes=None) -> torch.Tensor:
        z = self._tensor(X)
        if getattr(self, "normalize", False):
            z = F.normalize(z, dim=1)
        with torch.no_grad():
            return sparse_krr(z, self.support_, targets, k=self.k, kernel=self.kernel,
                              lengthscale=self.lengthscale_, ridge=self.ridge, backend=self.backend,
                              continuous=self.continuous, taper=self.taper, num_classes=num_classes)


class SparseKernelRegressor(RegressorMixin, _SparseKernelBase):
    """Sparse Kernel regression: a k x k kernel ridge regression on each point's k nearest neighbours.

    Parameters:
        k: neighbours per point (k >= n_samples: exact kernel ridge regression).
        kernel: ``"gaussian"``, ``"laplacian"``, ``"matern32"``, ``"matern52"``, ``"imq"`` or ``"linear"``.
        lengthscale: l > 0, or ``"auto"`` (median distance to the k-th neighbour in the training set).
        ridge: lambda >= 0.
        continuous, taper: the continuous variant (predictions continuous in X), see ``sk.krr``.
        backend: neighbour search, ``"torch"``, ``"faiss"`` or ``"faiss-ivf"``.
        device, dtype: where and in which precision torch computes.

    Fitted attributes: ``support_`` (n, d), ``targets_`` (n,) or (n, c), ``lengthscale_``,
    ``n_features_in_`` (and ``feature_names_in_`` for named columns). Multi-output targets are native.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Keep (X, y) as the support set and resolve the lengthscale; returns self."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=True, multi_output=True)
        self._fit_support(X)
        self.targets_ = self._tensor(y)
        return self

    def predict(self, X):
        """Predictions (n,) or (n, c) as a numpy array."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self._scores(X, self.targets_).cpu().numpy()


class SparseKernelClassifier(ClassifierMixin, _SparseKernelBase):
    """Sparse Kernel classification: SK regression of the class indicators, without one-hot targets.

    The scores f_c(x) (the label path of ``sk.sparse_krr``) estimate the class indicators; the predicted
    class is the best score (also where every score is <= 0), and
    ``predict_proba`` is the scores clipped at 0 and normalised to sum to 1 (uniform where no class scores
    above 0, far from every training point); its rows sum to 1 to rounding whatever the scale of the
    scores, subnormal totals included.

    Parameters: as ``SparseKernelRegressor``, and ``normalize``: L2-normalise inputs first (usual for
    self-supervised features). Fitted attributes: ``classes_``, ``labels_`` (class indices of the
    support), ``support_``, ``lengthscale_``, ``n_features_in_``.
    """

    def __init__(self, k=32, kernel="gaussian", lengthscale="auto", ridge=1e-3, continuous=False, taper=0.5,
                 backend="torch", device="cpu", dtype="float64", normalize=False):
        super().__init__(k=k, kernel=kernel, lengthscale=lengthscale, ridge=ridge, continuous=continuous,
                         taper=taper, backend=backend, device=device, dtype=dtype)
        self.normalize = normalize

    def fit(self, X, y):
        """Keep (X, labels) as the support set and resolve the lengthscale; returns self."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        self._fit_support(X)
        self.labels_ = torch.as_tensor(encoded.reshape(-1), dtype=torch.long, device=self.device)
        return self

    def _class_scores(self, X):
        """Class scores (n, n_classes): SK's regression of the class indicators. (Not scikit-learn's
        ``decision_function``, whose binary form is one column.)"""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self._scores(X, self.labels_, num_classes=len(self.classes_)).cpu().numpy()

    def predict_proba(self, X):
        """Class probabilities (n, n_classes): scores clipped at 0, normalised (uniform if all <= 0).

        Each row is divided by its largest entry before it is normalised: the row then sums to at least 1,
        so a total too small to divide by (subnormal) cannot leave the row short of 1."""
        scores = torch.from_numpy(self._class_scores(X)).clamp_min(0.0)
        top = scores.max(1, keepdim=True).values
        scaled = scores / torch.where(top > 0, top, torch.ones_like(top))
        proba = scaled / scaled.sum(1, keepdim=True).clamp_min(1.0)
        return torch.where(top > 0, proba, torch.full_like(proba, 1.0 / proba.shape[1])).numpy()

    def predict(self, X):
        """Predicted classes (n,): the class of the best score (not of the clipped probabilities, which
        tie at 0 where every score is <= 0)."""
        scores = self._class_scores(X)      # checks that the estimator is fitted
        return self.classes_[np.argmax(scores, axis=1)]
