"""Offline fixtures of the paper paths: fake CIFAR-10 / CIFAR-100 in torchvision's pickle layout and a
local timm checkpoint.

Each class has its own colour (a seeded palette) plus pixel noise, so any backbone separates the classes
and a probe that reads labels and images consistently scores far above chance: a test can check that.
torchvision verifies the real files' MD5 sums; tests patch ``torchvision.datasets.cifar.check_integrity``.
The checkpoint is timm's ``test_vit`` (6 blocks, width 64: a ViT-S/16-shaped model small enough for a test),
randomly initialised from a seed and saved as a state dict, read back through ``backbone.checkpoint_path``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _images(labels: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8 rows in CIFAR's layout (channel-major 32x32 planes): class colour + noise."""
    base = palette[labels][:, :, None].repeat(1024, axis=2)  # (N, 3, 1024)
    noise = rng.integers(-12, 13, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_fake_cifar(root: Path, name: str, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """Write fake ``cifar10`` or ``cifar100`` under ``root`` (balanced classes, shuffled); returns ``root``."""
    num_classes = {"cifar10": 10, "cifar100": 100}[name]
    rng = np.random.default_rng(seed)
    palette = rng.integers(20, 236, (num_classes, 3))
    y_train = rng.permutation(np.arange(num_classes).repeat(train_per_class))
    y_test = rng.permutation(np.arange(num_classes).repeat(test_per_class))
    x_train, x_test = _images(y_train, palette, rng), _images(y_test, palette, rng)
    if name == "cifar10":
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, (xs, ys) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5)), start=1):
            _dump(folder / f"data_batch_{i}", {"data": xs, "labels": ys.tolist()})
        _dump(folder / "test_batch", {"data": x_test, "labels": y_test.tolist()})
        _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True)
        _dump(folder / "train", {"data": x_train, "fine_labels": y_train.tolist(), "coarse_labels": (y_train // 5).tolist()})
        _dump(folder / "test", {"data": x_test, "fine_labels": y_test.tolist(), "coarse_labels": (y_test // 5).tolist()})
        _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                "coarse_label_names": [f"g{i}" for i in range(20)]})
    return Path(root)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


TIMM_MODEL = "test_vit"


def write_timm_checkpoint(path: Path, img_size: int = 32, seed: int = 0, model: str = TIMM_MODEL) -> Path:
    """Save a seeded random timm ``model`` (built for ``img_size``, no classifier) to ``path``."""
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(model, pretrained=False, num_classes=0, img_size=img_size)
    torch.save(net.state_dict(), path)
    return Path(path)


def refuse_network(monkeypatch) -> None:
    """Make every route to the network used by timm / torch.hub / sockets fail loudly."""
    import socket

    import timm.models._builder as builder
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", refuse)


def allow_fake_cifar(monkeypatch) -> None:
    """torchvision checks CIFAR's files against the real MD5 sums: accept the fixture's own."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
