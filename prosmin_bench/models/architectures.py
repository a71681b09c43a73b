"""Backbone architectures by name (no weights here: weights have their own names, see ``models/zoo.py``).

``vit_micro`` is the suite's 32-px ViT for the mini scale (~0.46M parameters: dim 96, depth 4, 3 heads, patch 4;
PROTOCOLS.md "Measured here on the mini data"). ``vit_small_patch16`` is timm's ViT-S/16 as used by DINO, iBOT,
MoCo-v3 and ProSMin. Any timm model is reachable as ``timm:<name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ..registry import Registry

ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry("architecture", "prosmin-bench list models")


def _timm_vit(name: str, **kwargs: Any) -> nn.Module:
    import timm

    kwargs.setdefault("num_classes", 0)  # backbone only: features, no classifier
    return timm.create_model(name, pretrained=False, **kwargs)


@ARCHITECTURES.register("vit_micro")
def vit_micro(**kwargs: Any) -> nn.Module:
    """ViT for 32x32 inputs: 8x8 = 64 patches of 4 px, width 96, 4 blocks, 3 heads (~0.46M parameters)."""
    from timm.models.vision_transformer import VisionTransformer

    cfg: dict[str, Any] = dict(
        img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=0
    )
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


@ARCHITECTURES.register("vit_small_patch16")
def vit_small_patch16(**kwargs: Any) -> nn.Module:
    """ViT-S/16 at 224 px (dim 384, depth 12, 6 heads unless ``num_heads`` says otherwise: MoCo-v3 uses 12)."""
    return _timm_vit("vit_small_patch16_224", **kwargs)


@ARCHITECTURES.register("vit_base_patch16")
def vit_base_patch16(**kwargs: Any) -> nn.Module:
    """ViT-B/16 at 224 px."""
    return _timm_vit("vit_base_patch16_224", **kwargs)


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised backbone; ``timm:<name>`` builds any timm model without a classifier."""
    if name.startswith("timm:"):
        return _timm_vit(name[len("timm:") :], **kwargs)
    return ARCHITECTURES.get(name)(**kwargs)
