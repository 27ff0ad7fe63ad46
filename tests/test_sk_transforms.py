"""SK checked once against every way a PyTorch user calls it (PyTorch's OpInfo style): each call form of SK
crossed with each transform, on one torch thread and on two. Every cell must give the values and the
gradients of the plain ``backward`` on one thread.

Call forms: the plain tensor path (gradients to the queries and the support), integer labels, a
``PrecomputedSupport`` without and with its N x N distances, the continuous variant, and an ``SKLayer`` (with
a cached prepared support and a learned lengthscale). Transforms: ``backward``, ``torch.autograd.grad``,
``torch.func.grad`` and ``torch.func.vjp``, saved-tensor hooks, anomaly mode, ``no_grad``,
``inference_mode``, and a first call under ``inference_mode`` followed by training.
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import sk

pytestmark = pytest.mark.usefixtures("one_thread")

M, N, D, K, CHUNK = 23, 60, 4, 5, 5          # several chunks of local solves


def data():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(M, D, generator=g, dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(N, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (N,), generator=g)
    cot = torch.randn(M, 4, generator=g, dtype=torch.float64)
    return z, x, y, labels, cot


@dataclass
class CallForm:
    """``build(x, y, labels)`` returns ``f(z, *wrt_extra)`` and the extra inputs the gradient is taken to
    (besides the queries z)."""
    name: str
    build: Callable


def plain(x, y, labels):
    return (lambda z, xs: sk.sparse_krr(z, xs, y, k=K, lengthscale=1.1, ridge=0.05, chunk_size=CHUNK)), (x,)


def label_path(x, y, labels):
    return (lambda z: sk.sparse_krr(z, x, labels, k=K, num_classes=4, lengthscale=1.1, ridge=0.05,
                                    chunk_size=CHUNK)), ()


def support(distances):
    def build(x, y, labels):
        sup = sk.PrecomputedSupport(x, distances=distances)
        return (lambda z: sk.sparse_krr(z, sup, y, k=K, lengthscale=1.1, ridge=0.05, chunk_size=CHUNK)), ()
    return build


def continuous(x, y, labels):
    return (lambda z: sk.sparse_krr(z, x, y, k=K, lengthscale=1.1, ridge=0.05, continuous=True,
                                    chunk_size=CHUNK)), ()


def layer(x, y, labels):
    head = sk.SKLayer(x, y, k=K, lengthscale=1.1, ridge=0.05, learn_lengthscale=True, chunk_size=CHUNK,
                      precompute="distances").double()
    return head, ()


FORMS = [CallForm("plain", plain), CallForm("labels", label_path), CallForm("support", support(False)),
         CallForm("support-distances", support(True)), CallForm("continuous", continuous),
         CallForm("layer", layer)]


def weighted(out, cot):
    return (out * cot[:, :out.shape[1]]).sum()


def run_backward(f, inputs, cot):
    out = f(*inputs)
    weighted(out, cot).backward()
    return out.detach(), [t.grad for t in inputs]


def run_grad(f, inputs, cot):
    out = f(*inputs)
    return out.detach(), list(torch.autograd.grad(weighted(out, cot), inputs))


def run_func_grad(f, inputs, cot):
    plain_inputs = [t.detach() for t in inputs]
    argnums = tuple(range(len(inputs)))
    grads = torch.func.grad(lambda *a: weighted(f(*a), cot), argnums=argnums)(*plain_inputs)
    with torch.no_grad():
        out = f(*plain_inputs)
    return out, list(grads)


def run_func_vjp(f, inputs, cot):
    out, pullback = torch.func.vjp(f, *[t.detach() for t in inputs])
    return out.detach(), list(pullback(cot[:, :out.shape[1]].contiguous()))


def run_hooks(f, inputs, cot):
    """Saved tensors offloaded to clones (as ``save_on_cpu`` does): the hooks must see SK's saved tensors."""
    seen = []

    def pack(t):
        seen.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = f(*inputs)
    assert seen, "the saved-tensor hooks saw none of SK's saved tensors"
    return out.detach(), list(torch.autograd.grad(weighted(out, cot), inputs))


def run_anomaly(f, inputs, cot):
    with torch.autograd.detect_anomaly(check_nan=True):
        return run_grad(f, inputs, cot)


def run_no_grad(f, inputs, cot):
    with torch.no_grad():
        out = f(*inputs)
    assert not out.requires_grad
    return out, None


def run_inference(f, inputs, cot):
    with torch.inference_mode():
        out = f(*inputs)
    assert out.is_inference()
    return out.clone(), None


def run_after_inference(f, inputs, cot):
    """A first call under inference mode must leave nothing (a cached support, an identity) that a later
    training call cannot save for backward."""
    with torch.inference_mode():
        f(*[t.detach() for t in inputs])
    return run_grad(f, inputs, cot)


TRANSFORMS = {"backward": run_backward, "autograd.grad": run_grad, "func.grad": run_func_grad,
              "func.vjp": run_func_vjp, "saved_tensors_hooks": run_hooks, "anomaly": run_anomaly,
              "no_grad": run_no_grad, "inference_mode": run_inference, "inference-then-train": run_after_inference}


def evaluate(form: CallForm, transform: str, threads: int):
    z, x, y, labels, cot = data()
    f, extra = form.build(x, y, labels)
    inputs = [z.clone().requires_grad_()] + [t.clone().requires_grad_() for t in extra]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return TRANSFORMS[transform](f, inputs, cot)
    finally:
        torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("form", FORMS, ids=[f.name for f in FORMS])
def test_every_call_form_under_every_transform_and_thread_count(form, transform, threads):
    ref_out, ref_grads = evaluate(form, "backward", 1)
    out, grads = evaluate(form, transform, threads)
    assert torch.allclose(out, ref_out, atol=1e-10, rtol=1e-10)
    if grads is None:
        return
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert got is not None and torch.allclose(got, want, atol=1e-9, rtol=1e-9)


def test_vmap_is_refused_with_a_clear_error():
    z, x, y, _, _ = data()
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.func.vmap(lambda q: sk.sparse_krr(q, x, y, k=K))(z.view(1, M, D))
