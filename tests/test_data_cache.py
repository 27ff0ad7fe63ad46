"""Data loaders on fixtures the tests write, and cache keys that change with every part of the config."""
import gzip
import pickle

import numpy as np
import pytest
import torch
import torchvision

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
