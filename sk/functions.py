"""SK's custom autograd Functions, applied at the cost of a plain operation.

A Function written in the form that ``torch.func`` transforms accept (``forward`` without ``ctx`` and a
``setup_context``) is applied through ``inspect.signature`` on every call, to bind the forward's default
arguments: measured 21 us per apply against 5 us for the classic form (``forward(ctx, ...)``), which a
small call that applies two of them pays at every step. ``apply(cls, *args)`` applies the classic twin of
``cls`` (the same forward, context and backward) and ``cls`` itself only inside a ``torch.func`` transform.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["functorch_active", "apply", "outside_transforms"]

_TWINS: dict = {}


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def outside_transforms(*tensors: torch.Tensor):
    """A context in which operations on plain tensors give plain tensors even inside a ``torch.func``
    transform: for what SK prepares once and keeps (a prepared support, its casts), which would otherwise
    be wrapped at the transform's level and dead after it. A no-op outside transforms, or when one of
    ``tensors`` is itself a transform's tensor."""
    if not functorch_active() or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return nullcontext()
    return torch._C._DisableFuncTorch()


def _twin(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    twin = _TWINS.get(cls)
    if twin is None:
        def forward(ctx, *args):
            output = cls.forward(*args)
            cls.setup_context(ctx, args, output)
            return output

        twin = _TWINS[cls] = type(cls.__name__ + "Classic", (torch.autograd.Function,),
                                  {"forward": staticmethod(forward), "backward": staticmethod(cls.backward)})
    return twin


def apply(cls: type[torch.autograd.Function], *args):
    """``cls.apply(*args)`` for a Function in the ``setup_context`` form, without its per-call binding cost
    outside ``torch.func`` transforms (positional arguments only)."""
    return (cls if functorch_active() else _twin(cls)).apply(*args)
