"""Modules: the SK layer with its three parameter sets, and a training-free SK classifier.

``SKLayer`` maps evaluation points z (its input) to f(z) = SK prediction from a support set of
representations X with targets Y. X and Y are each, independently,

- a fixed buffer (cached backbone features, one-hot labels): pass the tensor;
- learned: pass the tensor and ``learn_representations=True`` / ``learn_targets=True`` (an
  ``nn.Parameter`` initialised from it);
- given per call: leave it ``None`` and pass ``forward(z, representations=..., targets=...)`` (e.g. the
  output of a trainable encoder on a support batch). A tensor passed per call also overrides a stored one.

The kernel module inside holds the lengthscale (learnable with ``learn_lengthscale=True``, stored as its
log); the ridge may be learned too (``learn_ridge=True``, stored as its log, so positive).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import Kernel, make_kernel
from .knn import auto_lengthscale, knn_search
from .krr import check_indices, check_inputs, check_ridge, sparse_krr_core

__all__ = ["SKLayer", "SKClassifier"]


class SKLayer(nn.Module):
    r"""Sparse Kernel layer: f(z_m) = K(z_m, X_{I_m}) (K(X_{I_m}, X_{I_m}) + \lambda I_k)^{-1} Y_{I_m}.

    Args:
        representations: (N, d) support representations X, or None to pass them per call.
        targets: (N, c) or (N,) targets Y, or None to pass them per call.
        k: neighbours per evaluation point.
        kernel: a kernel name (``"gaussian"``, ...) or a ``sk.Kernel`` module (then ``lengthscale`` and
            ``learn_lengthscale`` are taken from it).
        lengthscale: l > 0, or ``"auto"``: ``sk.auto_lengthscale`` of the stored representations at
            construction, or of the per-call representations at every call if none are stored.
        ridge: lambda >= 0 (> 0 if learned).
        learn_representations, learn_targets, learn_lengthscale, learn_ridge: make that set an
            ``nn.Parameter``.
        continuous: use the continuous SK variant (see ``sk.krr``): f continuous in z; needs ridge > 0.
        taper: fall-off width of the continuous weights, in (0, 1].
        backend, chunk_size, solve_dtype: as in ``sk.sparse_krr``.

    Shapes: ``forward(z (M, d)) -> (M, c)``, or (M,) for one-dimensional targets.

    Example::

        layer = sk.SKLayer(feats, F.one_hot(labels, 10).float(), k=32, lengthscale="auto",
                           learn_lengthscale=True)
        logits = layer(encoder(images))            # gradients reach the encoder and the lengthscale
    """

    def __init__(self, representations: Tensor | None = None, targets: Tensor | None = None, k: int = 32,
                 kernel: str | Kernel = "gaussian", lengthscale: float | str = 1.0, ridge: float = 1e-3, *,
                 learn_representations: bool = False, learn_targets: bool = False,
                 learn_lengthscale: bool = False, learn_ridge: bool = False, continuous: bool = False,
                 taper: float = 0.5, backend: str = "torch", chunk_size: int | None = None,
                 solve_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if continuous and not 0.0 < taper <= 1.0:
            raise ValueError(f"taper must be in (0, 1], got {taper}")
        check_ridge(ridge)
        self.k, self.continuous, self.taper = k, continuous, taper
        self.backend, self.chunk_size, self.solve_dtype = backend, chunk_size, solve_dtype
        self._store("representations", representations, learn_representations)
        self._store("targets", targets, learn_targets)

        self.auto_per_call = False
        if isinstance(kernel, Kernel):
            self.kernel = kernel
        else:
            if lengthscale == "auto":
                if self.representations is None:
                    if learn_lengthscale:
                        raise ValueError("lengthscale='auto' with learn_lengthscale=True needs stored representations")
                    self.auto_per_call = True
                    lengthscale = 1.0
                else:
                    lengthscale = auto_lengthscale(self.representations.detach(), k=k)
            self.kernel = make_kernel(kernel, lengthscale, learn_lengthscale)

        ridge_t = torch.as_tensor(float(ridge), dtype=torch.get_default_dtype())
        if learn_ridge:
            if float(ridge_t) <= 0:
                raise ValueError("a learned ridge is stored as its log and must start > 0")
            self.log_ridge = nn.Parameter(ridge_t.log())
        else:
            self.register_buffer("fixed_ridge", ridge_t)

    def _store(self, name: str, value: Tensor | None, learn: bool) -> None:
        if value is None:
            if learn:
                raise ValueError(f"learn_{name}=True needs an initial {name} tensor")
            setattr(self, name, None)
        elif learn:
            setattr(self, name, nn.Parameter(value.detach().clone()))
        else:
            self.register_buffer(name, value.detach().clone())

    @property
    def ridge(self) -> Tensor:
        """lambda, a 0-dim tensor (exp of a parameter when learned)."""
        return self.log_ridge.exp() if hasattr(self, "log_ridge") else self.fixed_ridge

    def forward(self, z: Tensor, representations: Tensor | None = None, targets: Tensor | None = None,
                indices: Tensor | None = None) -> Tensor:
        """f(z): (M, d) -> (M, c) or (M,). ``indices`` (M, k') reuses a neighbour search (see sparse_krr)."""
        x = representations if representations is not None else self.representations
        y = targets if targets is not None else self.targets
        if x is None or y is None:
            raise ValueError("no representations/targets stored: pass them to forward(z, representations, targets)")
        check_inputs(z, x, y, self.k)
        n = x.shape[0]
        k = min(self.k, n)
        continuous = self.continuous and self.k < n
        need = k + 1 if continuous else k
        if indices is None:
            _, idx = knn_search(z, x, need, backend=self.backend)
        else:
            idx = check_indices(indices, z.shape[0], n, need, z.device)
        lengthscale = auto_lengthscale(x.detach(), k=k) if self.auto_per_call else self.kernel.lengthscale
        y2 = (y.unsqueeze(1) if y.dim() == 1 else y).to(z.dtype)
        out = sparse_krr_core(z, x, y2, idx, type(self.kernel), lengthscale, self.ridge, self.chunk_size,
                              self.solve_dtype, continuous, self.taper)
        return out.squeeze(1) if y.dim() == 1 else out

    def extra_repr(self) -> str:
        return f"k={self.k}, continuous={self.continuous}, backend={self.backend!r}"


class SKClassifier(SKLayer):
    """Training-free classifier: SK regression on one-hot labels; logits (M, C) = f(z).

    Args:
        features: (N, d) support features. labels: (N,) integers in [0, num_classes).
        num_classes: C. k, kernel, lengthscale (default ``"auto"``), ridge: as in ``SKLayer``.
        normalize: L2-normalise features and inputs first (usual for self-supervised features).
        **layer_kwargs: other ``SKLayer`` options (learn_*, continuous, backend, solve_dtype, ...).

    Example::

        clf = sk.SKClassifier(train_feats, train_labels, num_classes=10, k=32)
        acc = (clf.predict(test_feats) == test_labels).float().mean()
    """

    def __init__(self, features: Tensor, labels: Tensor, num_classes: int, k: int = 32,
                 kernel: str | Kernel = "gaussian", lengthscale: float | str = "auto", ridge: float = 1e-3, *,
                 normalize: bool = False, **layer_kwargs):
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be (N,) with N={features.shape[0]}, got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        self.normalize = normalize
        if normalize:
            features = F.normalize(features, dim=1)
        targets = F.one_hot(labels.long(), num_classes).to(features.dtype)
        super().__init__(features, targets, k, kernel, lengthscale, ridge, **layer_kwargs)
        self.num_classes = num_classes
        self.register_buffer("labels", labels.detach().clone().long())

    def forward(self, z: Tensor, representations: Tensor | None = None, targets: Tensor | None = None,
                indices: Tensor | None = None) -> Tensor:
        """Logits (M, C)."""
        if self.normalize:
            z = F.normalize(z, dim=1)
            if representations is not None:
                representations = F.normalize(representations, dim=1)
            elif isinstance(self.representations, nn.Parameter):
                representations = F.normalize(self.representations, dim=1)
        return super().forward(z, representations, targets, indices)

    @torch.no_grad()
    def predict(self, z: Tensor, chunk_size: int = 8192) -> Tensor:
        """Predicted labels (M,), computed in chunks of ``chunk_size`` points without gradients."""
        preds = [self(z[s:s + chunk_size]).argmax(1) for s in range(0, z.shape[0], chunk_size)]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=z.device)
