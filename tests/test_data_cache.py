"""Data loaders on fixtures the tests write, and cache keys that change with every part of the config."""
import gzip
import pickle

import numpy as np
import pytest
import torch
import torchvision

import importlib.util

from experiments.core import cache as cache_mod
from experiments.core.cache import FeatureCache, cache_key, module_fingerprint
from experiments.core.data import DataNotFoundError, load_cifar, load_dataset, load_fashion_mnist, train_val_split
from omegaconf import OmegaConf


def write_idx(path, arr: np.ndarray):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_fashion(folder, n_train=12, n_test=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_found_in_each_layout(tmp_path, layout):
    fake_fashion(tmp_path / layout if layout else tmp_path / "x")
    root = tmp_path if layout else tmp_path / "x"
    d = load_fashion_mnist(root)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (4, 1, 28, 28)
    assert d.x_train.dtype == torch.uint8 and d.y_train.tolist() == [i % 10 for i in range(12)]
    assert d.source.startswith(str(tmp_path))


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    import experiments.core.data as data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty")


def test_truncated_idx_file_is_rejected(tmp_path):
    fake_fashion(tmp_path / "f")
    p = tmp_path / "f" / "train-images-idx3-ubyte.gz"
    raw = gzip.open(p).read()
    with gzip.open(p, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist(tmp_path / "f")


def fake_cifar10(root, n_per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_in_torchvision_layout(tmp_path, monkeypatch):
    fake_cifar10(tmp_path)
    # torchvision checks the real files' MD5 sums; the fixture's files are our own.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d = load_cifar("cifar10", tmp_path, download=False)
    assert d.x_train.shape == (30, 3, 32, 32) and d.x_test.shape == (6, 3, 32, 32)
    assert d.num_classes == 10 and d.classes[0] == "c0"


def test_cifar_missing_without_download_fails_clearly(tmp_path):
    with pytest.raises(DataNotFoundError, match="data.download=true"):
        load_cifar("cifar10", tmp_path, download=False)


def test_digits_and_unknown_data_set():
    d = load_dataset(OmegaConf.create({"name": "digits"}))
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.y_train) + len(d.y_test) == 1797
    with pytest.raises(ValueError, match="unknown data set 'mnist2'"):
        load_dataset(OmegaConf.create({"name": "mnist2"}))


def test_train_val_split_is_seeded_and_disjoint():
    a_tr, a_va = train_val_split(100, 20, seed=1)
    b_tr, b_va = train_val_split(100, 20, seed=1)
    assert torch.equal(a_va, b_va) and len(a_va) == 20
    assert not set(a_tr.tolist()) & set(a_va.tolist())
    assert not torch.equal(a_va, train_val_split(100, 20, seed=2)[1])


BASE = {"kind": "features", "backbone": {"name": "small_cnn", "width": 32}, "weights": "abc",
        "split": {"data": "fashion_mnist", "indices": [1, 2, 3]}, "preprocess": {"size": 64, "mean": [0.5]}}


@pytest.mark.parametrize("path,value", [("backbone.name", "resnet18"), ("backbone.width", 64), ("weights", "abd"),
                                        ("split.data", "cifar10"), ("split.indices", [1, 2, 4]),
                                        ("preprocess.size", 96), ("preprocess.mean", [0.4])])
def test_cache_key_changes_with_every_part(path, value):
    changed = OmegaConf.to_container(OmegaConf.create(BASE))
    node = changed
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    assert cache_key(changed) != cache_key(BASE)
    assert cache_key(dict(BASE)) == cache_key(BASE)


def test_cache_reuses_only_the_same_configuration(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute(v):
        calls.append(v)
        return torch.full((2,), float(v))

    a = cache.get_or_compute(BASE, lambda: compute(1))
    b = cache.get_or_compute(BASE, lambda: compute(2))
    c = cache.get_or_compute({**BASE, "weights": "other"}, lambda: compute(3))
    assert calls == [1, 3] and torch.equal(a, b) and c[0] == 3


def test_module_fingerprint_tracks_weights():
    m = torch.nn.Linear(3, 2)
    before = module_fingerprint(m)
    with torch.no_grad():
        m.weight[0, 0] += 1
    assert module_fingerprint(m) != before


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CALLER = """
def features(cache, calls):
    return cache.get_or_compute({"kind": "features", "data": "d"}, lambda: calls.append(1) or torch.ones(2) * VERSION)

import torch
VERSION = %d
"""


def test_edited_caller_code_is_not_served_old_artefacts(tmp_path):
    """The key holds a fingerprint of the module that called the cache: editing it gives a new entry."""
    cache, calls = FeatureCache(tmp_path / "cache"), []
    path = tmp_path / "experiment_x.py"
    path.write_text(CALLER % 1)
    assert _load_module(path, "experiment_x").features(cache, calls).tolist() == [1.0, 1.0]
    assert _load_module(path, "experiment_x").features(cache, calls).tolist() == [1.0, 1.0]
    assert calls == [1]  # same code: reused
    path.write_text(CALLER % 2)
    assert _load_module(path, "experiment_x").features(cache, calls).tolist() == [2.0, 2.0]
    assert calls == [1, 1]  # edited code: computed again, not the old artefact


def test_edited_shared_code_changes_every_key(tmp_path, monkeypatch):
    shared = tmp_path / "sk_copy"
    shared.mkdir()
    (shared / "krr.py").write_text("RIDGE = 1e-3\n")
    monkeypatch.setattr(cache_mod, "SHARED_CODE", [shared])
    cache = FeatureCache(tmp_path / "cache")
    before = cache.path(BASE)
    assert cache.path(BASE) == before
    (shared / "krr.py").write_text("RIDGE = 1e-4\n")
    assert cache.path(BASE) != before
    (shared / "krr.py").write_text("RIDGE = 1e-3\n")
    (shared / "new.py").write_text("")  # a new source file counts too
    assert cache.path(BASE) != before


def test_default_fingerprint_covers_the_library_core_backbones_and_callers():
    names = {p.relative_to(cache_mod.ROOT).as_posix() for p in cache_mod.SHARED_CODE}
    assert names == {"sk", "experiments/core", "experiments/backbones"}
    assert cache_mod._caller_files()[0] == __file__
    assert cache_mod.code_fingerprint([__file__]) != cache_mod.code_fingerprint([cache_mod.ROOT / "experiments" / "transfer.py"])


def test_experiment_counts_when_a_shared_helper_asks_the_cache(tmp_path):
    """The experiment on the call stack is fingerprinted even when a helper of experiments/core asks."""
    cache = FeatureCache(tmp_path)
    helper = {"cache": cache}
    exec(compile("def features():\n    return cache.path({'kind': 'x'})\n",
                 str(cache_mod.ROOT / "experiments" / "core" / "helper_for_test.py"), "exec"), helper)
    paths = []
    for experiment in ("transfer.py", "vit_probe.py"):
        scope = {"features": helper["features"]}
        exec(compile("def run():\n    return features()\n", str(cache_mod.ROOT / "experiments" / experiment), "exec"), scope)
        paths.append(scope["run"]())
    assert paths[0] != paths[1]


def test_explicit_code_fingerprint(tmp_path):
    a, b = FeatureCache(tmp_path, code="v1"), FeatureCache(tmp_path, code="v2")
    assert a.path(BASE) == FeatureCache(tmp_path, code="v1").path(BASE) != b.path(BASE)
    a.save(BASE, torch.zeros(1))
    assert b.load(BASE) is None and a.load(BASE).tolist() == [0.0]
    with pytest.raises(ValueError, match="_code"):
        a.path({**BASE, "_code": "x"})
