"""The DeiT fine-tuning recipe's pieces, built from timm's objects (the loop is ``tasks/finetune.py``, whose module
docstring gives the recipe and its sources): the card's RandAugment string checked by timm's parser, the training
transform, Mixup / CutMix, stochastic depth on a ViT's blocks, and the seeded global generators timm's augmentations
draw from."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.auto_augment import posterize as timm_posterize
from timm.layers import DropPath

from .base import BackboneFace

if TYPE_CHECKING:  # the params live with the loop; this module only reads them
    from .finetune import FinetuneParams

# Line references: DeiT = facebookresearch/deit main.py; iBOT-semi = bytedance/ibot
# evaluation/semi_supervised/eval_cls.py.
_RA_SECTION = re.compile(r"^(t.+|[a-z]+\d.*)$")  # a section timm reads; timm skips others silently


def rand_augment_problem(config: str) -> str | None:
    """Why timm cannot use ``config`` as a RandAugment string (None when it can): timm's own parser
    (``rand_augment_transform``) must accept it, and every section must be one it reads (it skips the others)."""
    if not config.startswith("rand"):
        return "must start with 'rand' (timm RandAugment, e.g. 'rand-m9-mstd0.5-inc1') or be '' for none"
    sections = config.split("-")
    if sections[0] != "rand" or not all(_RA_SECTION.match(c) for c in sections[1:]):
        return "must be 'rand' followed by '-<key><number>' sections (m, n, mstd, mmax, inc, p), e.g. 'rand-m9-mstd0.5'"
    try:
        rand_augment_transform(config, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"timm cannot parse it ({type(exc).__name__}: {exc or 'unknown section'})"
    return None


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's RandAugment posterize for every bit count it draws. With ``mstd`` the magnitude reaches 10, where the
    increasing posterize keeps 0 bits; Pillow >= 10 rejects 0 (``ImageOps.posterize``: "bits must be between ... 1
    and 8"), older Pillow (DeiT's) masked every bit, giving a black image, which this reproduces."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked: zeros in every band
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(model: BackboneFace, p: FinetuneParams) -> Any:
    """timm's training transform (DeiT / iBOT ``build_transform``: iBOT-semi:397-410) at the model's crop size, with
    the model's normalisation: RandomResizedCrop (``crop_scale``), flip, RandAugment, colour jitter only without
    RandAugment, ToTensor, Normalize, RandomErasing. PIL image -> tensor [3, crop, crop]. RandAugment's posterize
    ops use :func:`_posterize` (same images, no Pillow error at 0 bits)."""
    pre = model.spec.preprocess
    tf = create_transform(
        input_size=pre.crop, is_training=True, scale=tuple(p.crop_scale), hflip=0.5 if p.hflip else 0.0,
        color_jitter=p.color_jitter or None, auto_augment=p.rand_augment or None,
        interpolation=p.train_interpolation, mean=tuple(pre.mean), std=tuple(pre.std),
        re_prob=p.random_erasing, re_mode=p.re_mode, re_count=p.re_count,
    )
    for op in tf.transforms:
        for aug in getattr(op, "ops", ()) if isinstance(op, RandAugment) else ():
            if aug.aug_fn is timm_posterize:
                aug.aug_fn = _posterize
    return tf


def build_mixup(p: FinetuneParams, num_classes: int) -> Mixup | None:
    """timm's Mixup / CutMix with the card's settings (DeiT:255-260, iBOT-semi:679-684), label smoothing folded into
    its soft targets; None when both alphas are 0 (then the loss is cross-entropy with label smoothing)."""
    if p.mixup <= 0 and p.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=p.mixup, cutmix_alpha=p.cutmix, prob=p.mixup_prob, switch_prob=p.mixup_switch_prob,
                 mode=p.mixup_mode, label_smoothing=p.label_smoothing, num_classes=num_classes)


def set_drop_path(net: nn.Module, rate: float) -> list[float]:
    """Stochastic depth on a timm ViT's blocks: block i of n gets ``rate * i / (n - 1)`` on both residual branches
    (timm's ``drop_path_rate`` rule, vision_transformer.py ``calculate_drop_path_rates``: linspace(0, rate, n)).
    Returns the per-block rates; [] for a network without timm ViT blocks (e.g. the pixel references), unchanged."""
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0 or not all(
            hasattr(b, "drop_path1") and hasattr(b, "drop_path2") for b in blocks):
        return []
    rates = [float(x) for x in torch.linspace(0, rate, len(blocks))]
    for block, r in zip(blocks, rates):
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
    return rates


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """timm's augmentations draw from Python's ``random`` (RandAugment, RandomResizedCrop, RandomErasing), NumPy's
    global generator (Mixup / CutMix) and torch's (RandomErasing's noise): seed all three for the run and restore
    them afterwards, so a fine-tune is a function of its seed and leaves the caller's generators as they were.
    DataLoader workers seed their own from the loader's generator."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)
