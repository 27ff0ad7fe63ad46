"""sk.SKLayer and sk.SKClassifier: the three parameter sets, state_dict, no_grad, devices."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sk


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=80, m=20, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, c, generator=g)


def test_fixed_sets_are_buffers_and_match_the_functional_api():
    z, x, y = data()
    layer = sk.SKLayer(x, y, k=8, kernel="matern32", lengthscale=1.2, ridge=1e-2)
    assert list(layer.parameters()) == []
    assert {"representations", "targets", "fixed_ridge", "kernel.log_lengthscale"} <= set(layer.state_dict())
    expect = sk.sparse_krr(z, x, y, k=8, kernel="matern32", lengthscale=1.2, ridge=1e-2)
    assert torch.allclose(layer(z), expect, atol=1e-5)


def test_learnable_sets_get_gradients():
    z, x, y = data()
    layer = sk.SKLayer(x, y, k=8, lengthscale="auto", ridge=1e-2, learn_representations=True,
                       learn_targets=True, learn_lengthscale=True, learn_ridge=True)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"representations", "targets", "kernel.log_lengthscale", "log_ridge"}
    z = z.clone().requires_grad_()
    layer(z).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert abs(float(layer.kernel.lengthscale.detach()) - sk.auto_lengthscale(x, k=8)) < 1e-5
    assert abs(float(layer.ridge.detach()) - 1e-2) < 1e-8


def test_per_call_sets_and_an_upstream_encoder():
    z, x, y = data()
    encoder = nn.Linear(5, 4)
    layer = sk.SKLayer(k=8, lengthscale="auto")
    out = layer(encoder(z), representations=encoder(x), targets=y)
    assert out.shape == (20, 3)
    out.sum().backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    # A per-call tensor overrides a stored one.
    stored = sk.SKLayer(x, y, k=8, lengthscale=1.0)
    assert torch.allclose(stored(z, targets=2 * y), 2 * stored(z), atol=1e-5)
    with pytest.raises(ValueError, match="no representations"):
        sk.SKLayer(k=3)(z)


def test_state_dict_round_trip():
    z, x, y = data()
    a = sk.SKLayer(x, y, k=8, lengthscale=0.7, ridge=0.1, learn_representations=True, learn_lengthscale=True,
                   learn_ridge=True)
    with torch.no_grad():
        a.representations.add_(0.1)
        a.kernel.log_lengthscale.add_(0.3)
    b = sk.SKLayer(torch.zeros_like(x), torch.zeros_like(y), k=8, lengthscale=2.0, ridge=1.0,
                   learn_representations=True, learn_lengthscale=True, learn_ridge=True)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(z), b(z))


def test_no_grad_and_one_dimensional_targets():
    z, x, y = data()
    layer = sk.SKLayer(x, y[:, 0], k=8, learn_lengthscale=True)
    with torch.no_grad():
        out = layer(z)
    assert out.shape == (20,) and not out.requires_grad
    assert layer(z).requires_grad


def test_kernel_module_and_continuous_options():
    z, x, y = data()
    kern = sk.Laplacian(lengthscale=1.5, learn_lengthscale=True)
    layer = sk.SKLayer(x, y, k=8, kernel=kern, ridge=1e-2, continuous=True)
    assert layer.kernel is kern
    expect = sk.sparse_krr(z, x, y, k=8, kernel="laplacian", lengthscale=1.5, ridge=1e-2, continuous=True)
    assert torch.allclose(layer(z), expect, atol=1e-5)


def test_classifier_logits_predict_and_accuracy():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(4, 6, generator=g)
    labels = torch.randint(0, 4, (400,), generator=g)
    feats = centres[labels] + torch.randn(400, 6, generator=g)
    test_labels = torch.randint(0, 4, (100,), generator=g)
    test = centres[test_labels] + torch.randn(100, 6, generator=g)
    clf = sk.SKClassifier(feats, labels, num_classes=4, k=16)
    logits = clf(test)
    assert logits.shape == (100, 4)
    pred = clf.predict(test, chunk_size=7)
    assert torch.equal(pred, logits.argmax(1))
    assert (pred == test_labels).float().mean() > 0.9
    expect = sk.sparse_krr(test, feats, F.one_hot(labels, 4).float(), k=16, lengthscale=clf.kernel.lengthscale)
    assert torch.allclose(logits, expect, atol=1e-5)
    again = sk.SKClassifier(feats, labels, num_classes=4, k=16, lengthscale=3.0)
    again.load_state_dict(clf.state_dict())
    assert torch.equal(again.predict(test), pred)
    normed = sk.SKClassifier(feats, labels, num_classes=4, k=16, normalize=True)
    assert (normed.predict(test) == test_labels).float().mean() > 0.8
    with pytest.raises(ValueError, match="labels"):
        sk.SKClassifier(feats, labels + 4, num_classes=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_on_cuda():
    z, x, y = data()
    layer = sk.SKLayer(x, y, k=8, learn_representations=True, learn_lengthscale=True).cuda()
    out = layer(z.cuda())
    assert out.device.type == "cuda"
    out.sum().backward()
    assert layer.representations.grad.device.type == "cuda"
    cpu = sk.SKLayer(x, y, k=8)(z)
    assert torch.allclose(out.detach().cpu(), cpu, atol=1e-4)
    clf = sk.SKClassifier(x, torch.arange(80) % 3, 3, k=8).cuda()
    assert clf.predict(z.cuda()).device.type == "cuda"
