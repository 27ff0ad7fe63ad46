"""Backbones created by name, as timm creates models: ``create(cfg.backbone)``.

Each backbone is an ``nn.Module`` whose ``forward(x)`` returns features (N, feature_dim) and which has a
``feature_dim`` attribute. The modules are imported lazily so that one backbone's optional dependency
(timm, efficientnet_lite_pytorch) is needed only when that backbone is used.

A backbone that can be fine-tuned on cached activations (experiments/transfer.py) also has
``split_last_block() -> (trunk, tail)``: two :class:`Part` modules sharing its weights, with
``tail(trunk(x)) == backbone(x)``; the tail's parameters are exactly those of the last block and what
follows it.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

# backbone name -> module under experiments.backbones defining build(cfg) -> nn.Module
REGISTRY = {
    "small_cnn": "cnn",
    "resnet18": "resnet",
    "vit_tiny28": "vit",
    "timm": "vit",
    "efficientnet_lite0": "efficientnet",
}


def create(cfg_backbone, **overrides) -> nn.Module:
    name = cfg_backbone.name
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}: known are {', '.join(sorted(REGISTRY))}")
    module = importlib.import_module(f"experiments.backbones.{REGISTRY[name]}")
    return module.build(cfg_backbone, **overrides)


class Part(nn.Module):
    """A piece of a network: registers the sub-modules it owns (so ``parameters()`` and ``to()`` see
    them) and calls the owner's function ``fn`` on its input."""

    def __init__(self, fn: Callable, modules: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self._fn = fn

    def forward(self, x):
        return self._fn(x)
