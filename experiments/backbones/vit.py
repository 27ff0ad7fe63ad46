"""Vision transformers from timm, with the tokens of every block for probing.

Two backbones share this module (``experiments.backbones.create(cfg.backbone)``):

- ``vit_tiny28`` (configs/backbone/vit_tiny28.yaml): a small ``timm`` ``VisionTransformer`` for 28x28
  grey images, randomly initialised here; experiments/vit_probe.py pretrains it (the offline default:
  no pretrained ViT ships offline).
- ``timm`` (configs/backbone/timm.yaml): any timm ViT by name with pretrained weights, from the hub, or
  from a local file when ``checkpoint_path`` is set: timm 1.0's ``create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=path))`` reads the file (safetensors or a torch state dict) through
  the model's own checkpoint filter (position embeddings are resampled when ``img_size`` differs) and
  never touches the network.

Both return a :class:`ViTBackbone`: ``forward(x)`` gives timm's pooled pre-logits features
(N, ``feature_dim``); :meth:`ViTBackbone.block_tokens` gives the output of every transformer block
(forward hooks on ``model.blocks``) and :meth:`ViTBackbone.probe_features` reduces each one to the CLS
token and the mean of the patch tokens. The block outputs are the residual stream before timm's final
norm, the usual place to probe intermediate depth.

For fine-tuning on cached activations (experiments/transfer.py), :meth:`ViTBackbone.split_last_block`
cuts a timm ``VisionTransformer`` into a frozen ``trunk`` (patch and position embedding, every block but
the last: (N, 3, S, S) -> (N, tokens, D)) and a trainable ``tail`` (the last block, the final norm and
timm's pooling head: -> (N, D)), with ``tail(trunk(x)) == forward(x)``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from experiments.backbones import Part


@contextlib.contextmanager
def block_hooks(model: nn.Module):
    """Collect the output of each block of ``model.blocks`` during forward passes, in block order.

    Example::

        with block_hooks(vit) as outputs:
            vit.forward_features(x)
        # outputs[i]: (N, tokens, embed_dim), the output of block i
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no `blocks`: per-block probing needs a timm ViT-style model")
    outputs: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for blk in blocks]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class ViTBackbone(nn.Module):
    """A timm vision transformer with its preprocessing and per-block token features.

    Attributes: ``feature_dim`` (embed dim), ``depth`` (number of blocks), ``img_size`` and ``in_chans``
    (the input it expects), ``mean_std`` (its normalisation, or None for "the data set's own"),
    ``interpolation`` (resize mode), ``has_cls`` and ``num_prefix_tokens`` (CLS and register tokens that
    precede the patch tokens).
    """

    def __init__(self, model: nn.Module, img_size: int, in_chans: int, mean_std=None,
                 interpolation: str = "bilinear"):
        super().__init__()
        self.model = model
        self.feature_dim = int(model.num_features)
        self.depth = len(model.blocks)
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.mean_std = mean_std
        self.interpolation = interpolation
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1 if self.has_cls else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def block_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One tensor (N, tokens, feature_dim) per block: the block's output, prefix tokens first."""
        with block_hooks(self.model) as outputs:
            self.model.forward_features(x)
        if len(outputs) != self.depth:
            raise RuntimeError(f"expected {self.depth} block outputs, the hooks saw {len(outputs)}")
        return list(outputs)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding and every block but the last (timm's ``forward_features`` up to there): -> (N, T, D)."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for block in m.blocks[:-1]:
            x = block(x)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The last block, the final norm and the pooling head (pre-logits): (N, T, D) -> (N, D)."""
        m = self.model
        return m.forward_head(m.norm(m.blocks[-1](x)), pre_logits=True)

    def split_last_block(self) -> tuple[nn.Module, nn.Module]:
        """(trunk, tail) modules sharing this network's weights; ``tail(trunk(x)) == self(x)``.

        The tail owns the last block, the final norm and the head's pooling and norm (its ``parameters()``
        are what fine-tuning trains); the trunk owns the rest. timm ``VisionTransformer`` models only:
        others (EVA's rotary embeddings, hybrid stems) call their blocks differently.
        """
        from timm.models.vision_transformer import VisionTransformer

        m = self.model
        if not isinstance(m, VisionTransformer):
            raise NotImplementedError(f"split_last_block supports timm VisionTransformer models, not {type(m).__name__}")
        tail_modules = [m.blocks[-1], m.norm, m.fc_norm] + ([m.attn_pool] if getattr(m, "attn_pool", None) is not None else [])
        owned = {id(p) for mod in tail_modules for p in mod.parameters()}
        trunk_modules = [m.patch_embed, m.pos_drop, m.patch_drop, m.norm_pre, *m.blocks[:-1]]
        trunk = Part(self.trunk, trunk_modules)
        for name in ("cls_token", "reg_token", "pos_embed"):  # parameters of the embedding, not of a module
            if isinstance(getattr(m, name, None), nn.Parameter):
                trunk.register_parameter(name, getattr(m, name))
        assert not owned & {id(p) for p in trunk.parameters()}
        return trunk, Part(self.tail, tail_modules)

    def probe_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"cls": (N, depth, D), "mean": (N, depth, D)}: each block's CLS token and mean patch token.

        "cls" is absent for models without a class token.
        """
        tokens = self.block_tokens(x)
        out = {"mean": torch.stack([t[:, self.num_prefix_tokens:].mean(dim=1) for t in tokens], dim=1)}
        if self.has_cls:
            out["cls"] = torch.stack([t[:, 0] for t in tokens], dim=1)
        return out


def _build_tiny28(cfg, overrides: dict) -> ViTBackbone:
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=int(cfg.get("img_size", 28)), patch_size=int(cfg.get("patch_size", 4)),
              in_chans=int(cfg.get("in_chans", 1)), embed_dim=int(cfg.get("embed_dim", 128)),
              depth=int(cfg.get("depth", 6)), num_heads=int(cfg.get("num_heads", 4)),
              mlp_ratio=float(cfg.get("mlp_ratio", 4.0)), num_classes=0, global_pool="token")
    kw.update(overrides)
    model = VisionTransformer(**kw)
    return ViTBackbone(model, img_size=kw["img_size"], in_chans=kw["in_chans"], mean_std=None,
                       interpolation="bilinear")


def _build_timm(cfg, overrides: dict) -> ViTBackbone:
    import timm
    from timm.data import resolve_data_config

    checkpoint = cfg.get("checkpoint_path")
    kw: dict = {"num_classes": 0}
    if cfg.get("img_size"):
        kw["img_size"] = int(cfg.img_size)
    if checkpoint:
        checkpoint = Path(str(checkpoint)).expanduser()
        if not checkpoint.is_file():
            raise FileNotFoundError(f"backbone.checkpoint_path={checkpoint} is not a file")
        kw["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
    kw.update(overrides)
    pretrained = bool(cfg.get("pretrained", True)) or bool(checkpoint)
    model = timm.create_model(str(cfg.model), pretrained=pretrained, **kw)
    data_cfg = resolve_data_config({}, model=model)
    # The pretrained config keeps the checkpoint's input size; a model built with another img_size
    # (position embeddings resampled) expects its own, which its patch embedding knows.
    patch_embed = getattr(model, "patch_embed", None)
    height = int(patch_embed.img_size[0]) if getattr(patch_embed, "img_size", None) else int(data_cfg["input_size"][1])
    proj = getattr(patch_embed, "proj", None)
    in_chans = int(proj.in_channels) if isinstance(proj, nn.Conv2d) else int(data_cfg["input_size"][0])
    return ViTBackbone(model, img_size=height, in_chans=in_chans,
                       mean_std=(tuple(data_cfg["mean"]), tuple(data_cfg["std"])),
                       interpolation=str(data_cfg.get("interpolation", "bicubic")))


def build(cfg_backbone, **overrides) -> ViTBackbone:
    """``cfg_backbone.name``: ``vit_tiny28`` or ``timm``; ``overrides`` go to the timm constructor."""
    name = cfg_backbone.name
    if name == "vit_tiny28":
        return _build_tiny28(cfg_backbone, overrides)
    if name == "timm":
        return _build_timm(cfg_backbone, overrides)
    raise ValueError(f"experiments.backbones.vit builds vit_tiny28 or timm, not {name!r}")
