"""Modules: the SK layer with its three parameter sets, and a training-free SK classifier.

``SKLayer`` maps evaluation points z (its input) to f(z) = SK prediction from a support set of
representations X with targets Y. X and Y are each, independently,

- a fixed buffer (cached backbone features, one-hot labels, integer labels with ``num_classes``):
  pass the tensor. The layer holds the tensor it is given, not a copy (``copy=True`` asks for one), so
  a large feature bank is never duplicated; changing the tensor in place changes the layer's support;
- learned: pass the tensor and ``learn_representations=True`` / ``learn_targets=True`` (an
  ``nn.Parameter`` initialised from a copy: an optimiser updates it in place, which must not write
  into the caller's tensor; learned integer labels start as their one-hot encoding);
- given per call: leave it ``None`` and pass ``forward(z, representations=..., targets=...)`` (e.g. the
  output of a trainable encoder on a support batch). A tensor passed per call also overrides a stored one.

The kernel module inside holds the lengthscale (learnable with ``learn_lengthscale=True``, stored as its
log); the ridge may be learned too (``learn_ridge=True``, stored as its log, so positive).
``SKLayer.forward`` is ``sk.sparse_krr`` with the layer's tensors and options: one code path.

Save and load: ``state_dict()`` carries, besides the tensors, the layer's configuration as extra state
(kernel type and learnability, k, continuous, taper, backend, chunk_size, solve_dtype, num_classes,
which sets are stored, fixed or learned). ``load_state_dict`` into any layer of the class, a bare
``sk.SKLayer()`` or ``sk.SKClassifier()`` included, rebuilds that configuration first and then loads the
tensors, so a saved SK head is restored without the code that built it, with the saved dtypes. A kernel
class of the user's (not in ``sk.KERNELS``) is found by its qualified name among the ``sk.Kernel``
subclasses defined in the process (import its module before loading); one that is not defined raises
``ValueError`` naming it. Loading replaces the layer's buffers (fixed representations and targets, fixed
hyperparameters) with fresh tensors: it never writes into a tensor the caller passed; parameters that
match in kind and shape are loaded in place (an optimiser holds them). State dicts written before the
extra state existed still load into a layer built with the same options. The extra state holds plain
Python values only, so ``torch.load(..., weights_only=True)`` reads it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import KERNELS, Kernel, make_kernel
from .knn import auto_lengthscale
from .krr import sparse_krr
from .support import PrecomputedSupport
from .validation import as_chunk_size, as_k, as_num_classes, check_labels, check_ridge, check_taper, is_labels

__all__ = ["SKLayer", "SKClassifier"]

_STATE_FORMAT = 1


class SKLayer(nn.Module):
    r"""Sparse Kernel layer: f(z_m) = K(z_m, X_{I_m}) (K(X_{I_m}, X_{I_m}) + \lambda I_k)^{-1} Y_{I_m}.

    Args:
        representations: (N, d) support representations X, or None to pass them per call.
        targets: (N, c) or (N,) float targets Y, (N,) integer labels with ``num_classes`` (the label path
            of ``sk.sparse_krr``: logits (M, C) without one-hot targets), or None to pass them per call.
        k: neighbours per evaluation point (any integer type).
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
        num_classes: C, for integer label targets.
        copy: store copies of fixed representations and targets (default: hold the given tensors).
        precompute: ``False`` (default), ``True`` or ``"distances"``: calls on a support that needs no gradient
            (the stored fixed representations, or per-call ones without grad) go through a cached
            ``sk.PrecomputedSupport`` of it (rebuilt when the tensor is replaced or changed in place through
            PyTorch; after a write that PyTorch does not count, through ``.data`` or a numpy view, call
            ``refresh()``), with its N x N distances for ``"distances"`` (for small supports queried many
            times; see ``sk.support``). Same results.

    Shapes: ``forward(z (M, d)) -> (M, c)``, (M, C) for labels, or (M,) for one-dimensional targets.

    Example::

        layer = sk.SKLayer(feats, labels, k=32, num_classes=10, lengthscale="auto", learn_lengthscale=True)
        logits = layer(encoder(images))            # gradients reach the encoder and the lengthscale
        torch.save(layer.state_dict(), "head.pt")
        head = sk.SKLayer()
        head.load_state_dict(torch.load("head.pt"))   # kernel, k, options and support restored
    """

    _slots = ("representations", "targets")

    def __init__(self, representations: Tensor | None = None, targets: Tensor | None = None, k: int = 32,
                 kernel: str | Kernel = "gaussian", lengthscale: float | str = 1.0, ridge: float = 1e-3, *,
                 learn_representations: bool = False, learn_targets: bool = False,
                 learn_lengthscale: bool = False, learn_ridge: bool = False, continuous: bool = False,
                 taper: float = 0.5, backend: str = "torch", chunk_size: int | None = None,
                 solve_dtype: torch.dtype | None = None, num_classes: int | None = None, copy: bool = False,
                 precompute: bool | str = False):
        super().__init__()
        self.k = as_k(k)
        self.precompute = _check_precompute(precompute)
        self._prepared = (None, None)
        check_taper(taper, continuous)
        check_ridge(ridge)
        num_classes = as_num_classes(num_classes)
        self.continuous, self.taper = continuous, taper
        self.backend, self.chunk_size, self.solve_dtype = backend, as_chunk_size(chunk_size), solve_dtype
        self.num_classes = num_classes
        if targets is not None and is_labels(targets):
            if num_classes is None:
                raise ValueError("integer label targets need num_classes=C")
            check_labels(targets, num_classes)
            if learn_targets:
                targets = F.one_hot(targets.long(), num_classes).to(torch.get_default_dtype())
        for name, value, learn in (("representations", representations, learn_representations),
                                   ("targets", targets, learn_targets)):
            if value is None:
                if learn:
                    raise ValueError(f"learn_{name}=True needs an initial {name} tensor")
                self._set_slot(name, None, None)
            elif learn:
                self._set_slot(name, nn.Parameter(value.detach().clone()), "parameter")
            else:
                self._set_slot(name, value.detach().clone() if copy else value.detach(), "buffer")

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
                    lengthscale = auto_lengthscale(self.representations.detach(), k=self.k)
            self.kernel = make_kernel(kernel, lengthscale, learn_lengthscale)

        ridge_t = torch.as_tensor(float(ridge), dtype=torch.get_default_dtype())
        if learn_ridge:
            if float(ridge_t) <= 0:
                raise ValueError("a learned ridge is stored as its log and must start > 0")
            self.log_ridge = nn.Parameter(ridge_t.log())
        else:
            self.register_buffer("fixed_ridge", ridge_t)

    # -- the support sets ---------------------------------------------------------------------------------
    def _set_slot(self, name: str, value: Tensor | None, kind: str | None) -> None:
        """Make ``name`` a parameter, a buffer or an empty (None) buffer, whatever it was before."""
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        self.__dict__.pop(name, None)
        if kind == "parameter":
            self.register_parameter(name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _slot_kind(self, name: str) -> str | None:
        if self._parameters.get(name) is not None:
            return "parameter"
        return "buffer" if self._buffers.get(name) is not None else None

    @property
    def ridge(self) -> Tensor:
        """lambda, a 0-dim tensor (exp of a parameter when learned)."""
        return self.log_ridge.exp() if "log_ridge" in self._parameters else self.fixed_ridge

    def forward(self, z: Tensor, representations: Tensor | None = None, targets: Tensor | None = None,
                indices: Tensor | None = None) -> Tensor:
        """f(z): (M, d) -> (M, c), (M, C) or (M,). ``indices`` (M, k') reuses a search (see sparse_krr)."""
        x = representations if representations is not None else self.representations
        y = targets if targets is not None else self.targets
        if x is None or y is None:
            raise ValueError("no representations/targets stored: pass them to forward(z, representations, targets)")
        if self.precompute and isinstance(x, Tensor) and not (x.requires_grad and torch.is_grad_enabled()):
            x = self._prepare(x.detach() if x.requires_grad else x)
        if self.auto_per_call:
            kernel, lengthscale = type(self.kernel), "auto"
        else:
            kernel, lengthscale = self.kernel, None
        return sparse_krr(z, x, y, k=self.k, kernel=kernel, lengthscale=lengthscale, ridge=self.ridge,
                          chunk_size=self.chunk_size, backend=self.backend, solve_dtype=self.solve_dtype,
                          indices=indices, continuous=self.continuous, taper=self.taper,
                          num_classes=self.num_classes if is_labels(y) else None)

    def _prepare(self, x: Tensor) -> PrecomputedSupport:
        """The cached ``PrecomputedSupport`` of x, rebuilt when x is another tensor or was changed in place."""
        key = (x.data_ptr(), x._version, x.shape, x.dtype, x.device, self.precompute)
        if self._prepared[0] != key:
            self._prepared = (key, PrecomputedSupport(x, distances=self.precompute == "distances",
                                                      dtype=self.solve_dtype))
        return self._prepared[1]

    def refresh(self) -> "SKLayer":
        """Drop the cached ``PrecomputedSupport`` (``precompute=``), so that the next call prepares the support
        again. Needed after a write to the stored representations that PyTorch's version counter does not
        see (``layer.representations.data.mul_(2)``, a numpy view): an in-place change through PyTorch is
        followed automatically. Returns self."""
        self._prepared = (None, None)
        return self

    def extra_repr(self) -> str:
        return f"k={self.k}, continuous={self.continuous}, backend={self.backend!r}"

    # -- save and load --------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The configuration that ``load_state_dict`` restores (plain Python values)."""
        return {
            "format": _STATE_FORMAT,
            "k": self.k,
            "kernel": self.kernel.name,
            "kernel_class": _qualified_name(type(self.kernel)),
            "learn_lengthscale": isinstance(self.kernel.log_lengthscale, nn.Parameter),
            "learn_ridge": "log_ridge" in self._parameters,
            "continuous": self.continuous,
            "taper": self.taper,
            "backend": self.backend,
            "chunk_size": self.chunk_size,
            "solve_dtype": None if self.solve_dtype is None else str(self.solve_dtype).replace("torch.", ""),
            "auto_per_call": self.auto_per_call,
            "num_classes": self.num_classes,
            "precompute": self.precompute,
            "slots": {name: self._slot_kind(name) for name in self._slots},
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not an sk layer state (format {_STATE_FORMAT}): {state!r:.200}")
        self.k = int(state["k"])
        self.continuous, self.taper = bool(state["continuous"]), float(state["taper"])
        self.backend, self.chunk_size = state["backend"], state["chunk_size"]
        self.solve_dtype = None if state["solve_dtype"] is None else getattr(torch, state["solve_dtype"])
        self.auto_per_call, self.num_classes = bool(state["auto_per_call"]), state["num_classes"]
        self.precompute = _check_precompute(state.get("precompute", False))
        self._prepared = (None, None)

    def _home_device(self) -> torch.device:
        return (self.log_ridge if "log_ridge" in self._parameters else self.fixed_ridge).device

    def _restructure(self, state: dict, state_dict: dict, prefix: str) -> None:
        """Make this layer's tensors the kind (buffer, parameter, None), shape and kind of dtype (labels or
        floats) that the saved layer had, and its kernel the saved type, so that the ordinary loading of
        the tensors that follows fills them. Matching parameters are left alone (an optimiser may hold
        them); rebuilt ones take the saved dtypes."""
        device = self._home_device()
        for name, kind in state["slots"].items():
            saved = state_dict.get(prefix + name)
            if kind is None:
                if self._slot_kind(name) is not None:
                    self._set_slot(name, None, None)
                continue
            if saved is None:
                continue  # a strict load reports the missing key
            have = getattr(self, name)
            if (self._slot_kind(name) != kind or have.shape != saved.shape
                    or have.is_floating_point() != saved.is_floating_point()):
                self._set_slot(name, torch.empty(saved.shape, dtype=saved.dtype, device=device), kind)
        learn_ridge = bool(state["learn_ridge"])
        if learn_ridge != ("log_ridge" in self._parameters):
            saved = state_dict.get(prefix + ("log_ridge" if learn_ridge else "fixed_ridge"))
            dtype = self.ridge.dtype if saved is None else saved.dtype
            self._parameters.pop("log_ridge", None)
            self._buffers.pop("fixed_ridge", None)
            if learn_ridge:
                self.log_ridge = nn.Parameter(torch.zeros((), dtype=dtype, device=device))
            else:
                self.register_buffer("fixed_ridge", torch.zeros((), dtype=dtype, device=device))
        cls, learn = _saved_kernel_class(state, self.kernel), bool(state["learn_lengthscale"])
        if type(self.kernel) is not cls or isinstance(self.kernel.log_lengthscale, nn.Parameter) != learn:
            saved = state_dict.get(prefix + "kernel.log_lengthscale")
            try:
                kernel = cls(1.0, learn_lengthscale=learn)
            except TypeError as err:
                raise ValueError(f"cannot rebuild the saved layer's kernel {_qualified_name(cls)} from its lengthscale "
                                 f"alone ({err}): build the layer with kernel={cls.__name__}(...) before loading") from err
            self.kernel = kernel.to(device=device, dtype=None if saved is None else saved.dtype)

    def _fresh_buffers(self, state_dict: dict, prefix: str) -> None:
        """Give every buffer that the state dict fills fresh storage of the saved shape and dtype, so that
        loading replaces the layer's tensors and never writes into one a caller passed (a feature bank held
        without a copy)."""
        for module, pre in ((self, prefix), (self.kernel, prefix + "kernel.")):
            for name, have in list(module._buffers.items()):
                saved = state_dict.get(pre + name)
                if have is not None and isinstance(saved, Tensor):
                    module._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=have.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"
        state = state_dict.get(key)
        if isinstance(state, dict) and state.get("format") == _STATE_FORMAT:
            self._restructure(state, state_dict, prefix)
        self._fresh_buffers(state_dict, prefix)
        self._prepared = (None, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # saved before the extra state existed: the layer's own options stay


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _kernel_classes(base: type = Kernel):
    for sub in base.__subclasses__():
        yield sub
        yield from _kernel_classes(sub)


def _saved_kernel_class(state: dict, current: Kernel) -> type[Kernel]:
    """The kernel class a saved layer used: found by its qualified name among the ``sk.Kernel`` subclasses
    defined in this process (a user's kernel included), never imported from the state; ValueError naming
    it when it is not defined (rather than loading its lengthscale into another kernel)."""
    qualified, name = state.get("kernel_class"), state["kernel"]
    if qualified is None:         # saved before the class was recorded: the name decides
        if name in KERNELS:
            return KERNELS[name]
        if current.name == name:
            return type(current)
    else:
        for cls in (type(current), *_kernel_classes()):
            if _qualified_name(cls) == qualified:
                return cls
    raise ValueError(f"the saved layer's kernel {qualified or name!r} is a sk.Kernel subclass that is not defined in "
                     "this process: import the module that defines it (or build the layer with that kernel) before "
                     "loading")


def _check_precompute(value) -> bool | str:
    if value not in (False, True, "distances"):
        raise ValueError(f"precompute must be False, True or 'distances', got {value!r}")
    return value


class SKClassifier(SKLayer):
    """Training-free classifier: SK on integer labels; logits (M, C) = f(z), never one-hot targets.

    With fixed targets (the default) the logits come from the label path of ``sk.sparse_krr``: one
    solve per point and a scatter-add by label, so time and memory do not grow with C beyond the (M, C)
    logits. With ``learn_targets=True`` the targets are a learned (N, C) parameter initialised one-hot.

    Args:
        features: (N, d) support features. labels: (N,) integers in [0, num_classes).
        num_classes: C. k, kernel, lengthscale (default ``"auto"``), ridge: as in ``SKLayer``.
        normalize: L2-normalise features and inputs first (usual for self-supervised features); the
            stored features are then a normalised copy.
        copy: store a copy of the features (default: hold the given tensor, unless normalised).
        **layer_kwargs: other ``SKLayer`` options (learn_*, continuous, backend, solve_dtype, ...).

    ``SKClassifier()`` with no arguments is an empty classifier for ``load_state_dict``.

    Example::

        clf = sk.SKClassifier(train_feats, train_labels, num_classes=10, k=32)
        acc = (clf.predict(test_feats) == test_labels).float().mean()
    """

    def __init__(self, features: Tensor | None = None, labels: Tensor | None = None,
                 num_classes: int | None = None, k: int = 32, kernel: str | Kernel = "gaussian",
                 lengthscale: float | str = "auto", ridge: float = 1e-3, *, normalize: bool = False,
                 copy: bool = False, **layer_kwargs):
        if (features is None) != (labels is None):
            raise ValueError("pass both features and labels, or neither (an empty classifier to load)")
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
                raise ValueError(f"labels must be (N,) with N={features.shape[0]}, got shape {tuple(labels.shape)}")
            if not is_labels(labels):
                raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
            if num_classes is None:
                raise ValueError("num_classes is required with labels")
            if normalize:
                features = F.normalize(features, dim=1)
        self.normalize = normalize
        super().__init__(features, labels, k, kernel, lengthscale, ridge, num_classes=num_classes, copy=copy,
                         **layer_kwargs)

    @property
    def labels(self) -> Tensor | None:
        """The support labels (N,): the stored integer targets, or the argmax of learned targets."""
        t = self.targets
        return t if t is None or is_labels(t) else t.detach().argmax(1)

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

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "normalize": self.normalize}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.normalize = bool(state.get("normalize", False))
