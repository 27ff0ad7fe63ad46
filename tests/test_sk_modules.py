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


@pytest.mark.cuda
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


# -- save and load without the code that built the layer -------------------------------------------------
def round_trip(sd):
    """Through bytes with the safe unpickler: the extra state holds plain Python values only."""
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


LAYERS = {
    "fixed-laplacian-continuous": lambda x, y: sk.SKLayer(x, y, k=7, kernel="laplacian", lengthscale=0.7, ridge=0.05,
                                                          continuous=True, taper=0.3),
    "all-learned-matern": lambda x, y: sk.SKLayer(x, y, k=9, kernel="matern52", lengthscale=1.3, ridge=0.1,
                                                  learn_representations=True, learn_targets=True,
                                                  learn_lengthscale=True, learn_ridge=True, solve_dtype=torch.float64),
    "labels": lambda x, y: sk.SKLayer(x, torch.arange(80) % 4, k=6, kernel="imq", lengthscale=1.1, num_classes=4),
    "per-call-support": lambda x, y: sk.SKLayer(None, y, k=5, kernel="gaussian", lengthscale="auto"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_restores_a_fresh_layer(name):
    z, x, y = data()
    a = LAYERS[name](x, y)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)                                             # trained away from the initial values
    b = sk.SKLayer()
    b.load_state_dict(round_trip(a.state_dict()))
    for attr in ("k", "continuous", "taper", "backend", "chunk_size", "solve_dtype", "num_classes", "auto_per_call"):
        assert getattr(b, attr) == getattr(a, attr), attr
    assert type(b.kernel) is type(a.kernel)
    assert {n for n, _ in b.named_parameters()} == {n for n, _ in a.named_parameters()}
    assert set(b.state_dict()) == set(a.state_dict())
    kw = {"representations": x} if name == "per-call-support" else {}
    assert torch.equal(b(z, **kw), a(z, **kw))


def test_classifier_restores_from_a_bare_classifier():
    z, x, _ = data()
    labels = torch.arange(80) % 3
    a = sk.SKClassifier(x, labels, num_classes=3, k=8, kernel="matern32", normalize=True)
    b = sk.SKClassifier()
    b.load_state_dict(round_trip(a.state_dict()))
    assert b.normalize and b.num_classes == 3 and b.kernel.name == "matern32"
    assert torch.equal(b(z), a(z)) and torch.equal(b.predict(z), a.predict(z))
    assert torch.equal(b.labels, labels)


def test_loading_keeps_matching_parameters_in_place_and_old_state_dicts_load():
    z, x, y = data()
    a = sk.SKLayer(x, y, k=8, learn_targets=True, learn_lengthscale=True)
    b = sk.SKLayer(x.clone(), torch.zeros_like(y), k=8, learn_targets=True, learn_lengthscale=True)
    params = list(b.parameters())                                   # what an optimiser holds
    b.load_state_dict(a.state_dict())
    assert all(p is q for p, q in zip(params, b.parameters()))
    assert torch.equal(b(z), a(z))
    old = {k: v for k, v in a.state_dict().items() if k != "_extra_state"}   # saved before the extra state
    c = sk.SKLayer(x, torch.zeros_like(y), k=8, learn_targets=True, learn_lengthscale=True)
    c.load_state_dict(old)
    assert torch.equal(c(z), a(z))


# -- one code path, no copies, the label path in the classifier -------------------------------------------
def test_forward_is_the_functional_api(monkeypatch):
    z, x, y = data()
    layer = sk.SKLayer(x, y, k=8, kernel="laplacian", lengthscale=0.9, continuous=True)
    calls = []
    real = sk.modules.sparse_krr

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sk.modules, "sparse_krr", spy)
    out = layer(z)
    assert len(calls) == 1 and calls[0]["kernel"] is layer.kernel and calls[0]["continuous"]
    assert torch.equal(out, real(z, x, y, k=8, kernel=layer.kernel, continuous=True))


def test_classifier_uses_labels_without_one_hot_targets():
    z, x, _ = data()
    labels = torch.arange(80) % 5
    clf = sk.SKClassifier(x, labels, num_classes=5, k=8, lengthscale=1.2)
    assert clf.targets.dtype == torch.long and clf.targets.data_ptr() == labels.data_ptr()
    assert clf.representations.data_ptr() == x.data_ptr()            # held, not copied
    onehot = sk.sparse_krr(z, x, F.one_hot(labels, 5).float(), k=8, lengthscale=clf.kernel.lengthscale)
    assert torch.allclose(clf(z), onehot, atol=1e-6)
    learned = sk.SKClassifier(x, labels, num_classes=5, k=8, lengthscale=1.2, learn_targets=True)
    assert isinstance(learned.targets, nn.Parameter) and learned.targets.shape == (80, 5)
    assert torch.allclose(learned(z), onehot, atol=1e-6) and torch.equal(learned.labels, labels)
    with pytest.raises(ValueError, match="integer"):
        sk.SKClassifier(x, labels.float(), num_classes=5)
