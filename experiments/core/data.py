"""Data sets, found offline first.

Fashion-MNIST is looked for, in order, in ``data.root`` (``$SK_DATA``, default ``./data``) as the four
IDX files (``train-images-idx3-ubyte.gz`` ...) directly, in ``fashion-mnist/`` or in torchvision's
``FashionMNIST/raw/`` layout; then in Debian's ``dataset-fashion-mnist`` folder
(``/usr/share/datasets/fashion-mnist``); and only then, if ``data.download=true``, downloaded through
torchvision. CIFAR-10/100 come through torchvision (``data.download=true`` by default on that path).
scikit-learn's bundled ``load_digits`` is a tiny offline set for smoke runs.

Images are kept as uint8 tensors (N, C, H, W); ``to_float`` scales and normalises them on demand.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
# Per-channel statistics of the training images, used by to_float(normalize=True).
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3048,), (0.3744,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class ImageData:
    """A labelled image data set with a fixed train/test split (uint8 images, int64 labels)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return STATS[self.name]


class DataNotFoundError(FileNotFoundError):
    pass


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _find_idx_folder(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        if all(_idx_file(folder, stem) is not None for stem in FASHION_FILES.values()):
            return folder
    return None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    return None


def fashion_mnist_folders(root: str | Path | None) -> list[Path]:
    folders = []
    if root is not None:
        root = Path(root)
        folders += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    folders.append(DEBIAN_FASHION_MNIST)
    return folders


def load_fashion_mnist(root: str | Path | None = None, download: bool = False) -> ImageData:
    candidates = fashion_mnist_folders(root)
    folder = _find_idx_folder(candidates)
    if folder is None and download:
        import torchvision

        if root is None:
            raise DataNotFoundError("data.download=true needs data.root (or $SK_DATA) to download into")
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        folder = _find_idx_folder(candidates)
    if folder is None:
        looked = "\n  ".join(str(c) for c in candidates)
        raise DataNotFoundError(
            "Fashion-MNIST not found. Looked in:\n  " + looked + "\nGet it with one of:\n"
            "  sudo apt-get install dataset-fashion-mnist      (Debian/Ubuntu, offline-friendly)\n"
            "  put the four *-ubyte.gz files in $SK_DATA (or ./data)\n"
            "  add data.download=true to download through torchvision")
    arrays = {k: read_idx(_idx_file(folder, stem)) for k, stem in FASHION_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise ValueError(f"Fashion-MNIST in {folder}: {split} images and labels differ in count")
    return ImageData(
        name="fashion_mnist",
        x_train=torch.from_numpy(arrays["x_train"].copy()).unsqueeze(1),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=torch.from_numpy(arrays["x_test"].copy()).unsqueeze(1),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=10, classes=list(FASHION_CLASSES), source=str(folder))


def load_cifar(name: str, root: str | Path, download: bool = True) -> ImageData:
    """CIFAR-10 or CIFAR-100 through torchvision (its folder layout under ``root``)."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataNotFoundError(
            f"{name} not found under {root} ({e}). Set data.root (or $SK_DATA) to a folder holding "
            f"torchvision's {cls.base_folder}/, or allow data.download=true on a machine with network") from e

    def to_tensor(ds):
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)

    x_train, y_train = to_tensor(train)
    x_test, y_test = to_tensor(test)
    return ImageData(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     num_classes=len(train.classes), classes=list(train.classes), source=str(root))


def load_digits() -> ImageData:
    """scikit-learn's 8x8 digits, split 1,497 train / 300 test by a fixed permutation."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:300], perm[300:]
    return ImageData(name="digits", x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test],
                     num_classes=10, classes=[str(i) for i in range(10)], source="sklearn.datasets.load_digits")


def load_dataset(cfg_data) -> ImageData:
    """Load the data set a ``data`` config group names."""
    name = cfg_data.name
    if name == "fashion_mnist":
        return load_fashion_mnist(cfg_data.get("root"), download=bool(cfg_data.get("download", False)))
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, cfg_data.root, download=bool(cfg_data.get("download", True)))
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown data set {name!r}: known are fashion_mnist, cifar10, cifar100, digits")


def train_val_split(n: int, val: int | float, seed: int | torch.Generator, *,
                    stratify: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (train, val) of a random validation split of ``n`` examples: the one splitter.

    Args:
        n: number of examples (indices 0..n-1).
        val: an int is the number of validation examples; a float in (0, 1) their share,
            ``max(1, round(val * n))`` (per class with ``stratify``), as in scikit-learn's
            ``train_test_split``.
        seed: an int (a fresh generator seeded with it) or a ``torch.Generator`` to draw from.
        stratify: labels (n,): split each class on its own, keeping at least one example of every class
            on both sides (needs a float ``val`` and two examples a class).
    """
    g = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
    if stratify is not None:
        if not isinstance(val, float) or len(stratify) != n:
            raise ValueError("a stratified split needs a float share val and n labels")
        train, held = [], []
        for c in stratify.unique().tolist():
            idx = (stratify == c).nonzero().flatten()
            if len(idx) < 2:
                raise ValueError(f"class {c} has {len(idx)} labelled example(s): no validation split possible")
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_val = min(max(1, round(val * len(idx))), len(idx) - 1)
            held.append(idx[:n_val])
            train.append(idx[n_val:])
        return torch.cat(train).sort().values, torch.cat(held).sort().values
    n_val = val if isinstance(val, int) else max(1, round(val * n))
    if not 0 < n_val < n:
        raise ValueError(f"a validation split of {n_val} from {n} examples leaves no training examples "
                         f"(or none for validation): it must be between 1 and {n - 1}")
    perm = torch.randperm(n, generator=g)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def to_float(x: torch.Tensor, mean_std: tuple | None = None, channels: int | None = None,
             size: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1], optionally normalised, channel-replicated and resized."""
    out = x.float().div_(255.0)
    if mean_std is not None:
        mean = torch.as_tensor(mean_std[0], dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        std = torch.as_tensor(mean_std[1], dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        out = (out - mean) / std
    if channels is not None and out.shape[1] != channels:
        if out.shape[1] != 1:
            raise ValueError(f"cannot turn {out.shape[1]} channels into {channels}")
        out = out.expand(-1, channels, -1, -1)
    if size is not None and out.shape[-1] != size:
        out = torch.nn.functional.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
    return out


def class_subset(data_x: torch.Tensor, data_y: torch.Tensor, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples whose label is in ``classes``, with labels remapped to 0..len(classes)-1."""
    classes = list(classes)
    mask = torch.isin(data_y, torch.tensor(classes))
    remap = torch.full((int(data_y.max()) + 1,), -1, dtype=torch.int64)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    return data_x[mask], remap[data_y[mask]]
