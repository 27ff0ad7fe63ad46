"""CIFAR-style ResNet-18 (He et al., 2016): the paper-scale CNN backbone for 32x32 colour images.

As usual for CIFAR, the ImageNet stem (7x7 stride-2 conv + max-pool) is replaced by a 3x3 stride-1 conv,
and there is no max-pool. Four stages of two BasicBlocks with 64, 128, 256, 512 channels (strides 1, 2,
2, 2), then global average pooling: ``forward(x (N, C, 32, 32)) -> features (N, 512)``; the ImageNet
classifier is left to the readout. ``feature_dim`` is 512.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 trunk: 3x3 stem, stages [2, 2, 2, 2] of BasicBlocks, global average pooling."""

    def __init__(self, in_channels: int = 3, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c_in = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(c_in, w, stride=2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = c_in

    def forward(self, x):
        return self.pool(self.layers(self.stem(x)))


def build(cfg_backbone, **overrides) -> ResNet18:
    """``cfg_backbone``: in_channels, feature_dim (must be 512) (configs/backbone/resnet18.yaml)."""
    in_channels = int(overrides.pop("in_channels", cfg_backbone.get("in_channels", 3)))
    if overrides:
        raise ValueError(f"resnet18 takes no options besides in_channels, got {sorted(overrides)}")
    model = ResNet18(in_channels=in_channels)
    want = cfg_backbone.get("feature_dim", 512)
    if want is not None and int(want) != model.feature_dim:
        raise ValueError(f"resnet18 features have 512 dimensions, backbone.feature_dim={want}")
    return model
