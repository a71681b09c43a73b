"""End-to-end fine-tuning of a backbone + linear head: the one loop the semi-supervised and transfer tasks share.

Recipe: DeiT's fine-tuning (facebookresearch/deit main.py), as iBOT runs it for semi-supervised
(bytedance/ibot evaluation/semi_supervised/eval_cls.py) and transfer (evaluation/eval_cls.py) evaluation and as
DINO's authors describe it (DINO issues #81, #171), built from timm's own objects rather than by hand:

- a copy of the backbone, every parameter trainable, stochastic depth ``drop_path`` on its blocks (timm's linear
  rule, 0 at the first block to ``drop_path`` at the last; backbones without timm ViT blocks get none);
- a new linear head on the final-norm CLS token (``finetune_head_layer = 0``) or, as iBOT's semi-supervised runs
  (``--finetune_head_layer 1``), on the first layer of the checkpoint's projection head (Linear + activation, kept
  and fine-tuned; ``Backbone.projector_first_layer``); a model without a head falls back to 0 with one warning, and
  the record's extras say which was used. Head weights N(0, 0.01), zero bias (DINO's classifier init);
- training images through ``timm.data.create_transform`` (RandomResizedCrop, flip, RandAugment, random erasing,
  the model's normalisation); batches through ``timm.data.Mixup`` (Mixup / CutMix, label smoothing folded into the
  soft targets) and ``timm.loss.SoftTargetCrossEntropy``; with Mixup and CutMix both 0, cross-entropy with label
  smoothing;
- AdamW, no weight decay on biases and 1-D parameters (norms, tokens), learning rate scaled by batch / 512 (DeiT's
  rule), linear warm-up from ``warmup_lr`` then cosine to ``min_lr``, stepped per iteration.

No layer-wise lr decay: neither iBOT script uses it for these runs (semi-supervised ``--layer_decay`` defaults to
1.0, eval_cls.py:102; the transfer script has none). Not implemented: repeated augmentation (DeiT's RASampler) and
the model EMA the scripts keep (they do not evaluate it). Model selection: the epoch with the best top-1 on a
stratified held-out part of the training data (ties: lower NLL); the test set is used once, at the end. The record's
``extras["recipe"]`` holds the training transform's repr, the Mixup settings, the loss and the drop-path rates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from .. import progress
from ..errors import CardError, ProsminBenchError
from ..settings import PRECISIONS
from .base import BackboneFace
from .finetune_recipe import _seeded_global_rngs, build_mixup, rand_augment_problem, set_drop_path, train_transform
from .probes import softmax, stratified_holdout

__all__ = ["Classifier", "FinetuneParams", "FinetuneResult", "build_mixup", "check_finetune_params", "finetune",
           "predict", "set_drop_path", "train_transform"]

log = logging.getLogger(__name__)


# Line references: DeiT = facebookresearch/deit main.py; iBOT-semi = bytedance/ibot
# evaluation/semi_supervised/eval_cls.py; iBOT-transfer = bytedance/ibot evaluation/eval_cls.py.
@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tuning hyperparameters; the ImageNet-scale values in the cards come from DINO / iBOT (sources there)."""

    epochs: int = 100
    batch_size: int = 768  # total; DINO issue #81 / iBOT run.sh:234 (transfer): 96 per GPU x 8
    lr: float = 7.5e-6  # per batch 512 (DeiT scaling, DeiT:350); iBOT run.sh:235 transfer on CIFAR / Flowers
    weight_decay: float = 0.05  # DeiT:66 / iBOT-semi:85 / DINO issue #81
    warmup_epochs: int = 5  # DeiT:86 / iBOT-semi:106 / DINO issue #81
    warmup_lr: float = 1e-6  # warm-up start, DeiT:79 / iBOT-semi:98 (timm scheduler warmup_lr_init)
    min_lr: float = 1e-5  # cosine floor, DeiT:81 / iBOT-semi:100 (capped at the scaled lr: never above it)
    label_smoothing: float = 0.1  # DeiT:101 / iBOT-semi:121; goes into Mixup's soft targets when Mixup/CutMix is on
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale (timm create_transform default, DeiT)
    hflip: bool = True  # p = 0.5 (timm create_transform default); off for digits (not flip-invariant)
    train_interpolation: str = "bicubic"  # DeiT:102 / iBOT-semi:122
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment config, DeiT:98 / iBOT-semi:118; "" = none
    color_jitter: float = 0.4  # iBOT-semi:116 (DeiT:96 has 0.3); timm applies it only when rand_augment is ""
    random_erasing: float = 0.25  # probability, DeiT:118 / iBOT-semi:130 (iBOT run.sh:314: 0.1 on iNat-18)
    re_mode: str = "pixel"  # DeiT:120 / iBOT-semi:132
    re_count: int = 1  # DeiT:122 / iBOT-semi:134
    mixup: float = 0.8  # Mixup alpha, DeiT:128 / iBOT-semi:140 / DINO issue #81; 0 = off
    cutmix: float = 1.0  # CutMix alpha, DeiT:130 / iBOT-semi:142 / DINO issue #81; 0 = off
    mixup_prob: float = 1.0  # probability of mixing a batch, DeiT:134 / iBOT-semi:146
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on, DeiT:136 / iBOT-semi:148
    mixup_mode: str = "batch"  # one lambda per "batch", "pair" or "elem"; DeiT:138 / iBOT-semi:150
    drop_path: float = 0.1  # stochastic depth rate at the last block, DeiT:46 / iBOT-semi:65 / DINO issue #81
    finetune_head_layer: int = 0  # 0: head on the final-norm CLS; 1: on the projection head's 1st layer (iBOT-semi:201)
    layer: str = "cls"  # the head reads the final-norm CLS token
    val_fraction: float = 0.1  # held-out part of the training data for choosing the epoch
    eval_every: int = 1  # epochs between held-out evaluations (the last epoch is always evaluated)
    n_bins: int = 15  # ECE bins (Guo et al. 2017)


_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
_RE_MODES = ("const", "rand", "pixel")
_MIXUP_MODES = ("batch", "pair", "elem")
def check_finetune_params(spec: Any, p: FinetuneParams) -> None:
    bad = []
    if p.epochs < 1 or p.batch_size < 1 or p.eval_every < 1:
        bad.append("'epochs', 'batch_size' and 'eval_every' must be >= 1")
    if p.lr <= 0 or p.weight_decay < 0 or p.warmup_epochs < 0:
        bad.append("'lr' must be > 0, 'weight_decay' and 'warmup_epochs' >= 0")
    if p.warmup_lr < 0 or p.min_lr < 0:
        bad.append("'warmup_lr' and 'min_lr' must be >= 0")
    if not 0 <= p.label_smoothing < 1:
        bad.append("'label_smoothing' must be in [0, 1)")
    if len(p.crop_scale) != 2 or not 0 < p.crop_scale[0] <= p.crop_scale[1] <= 1:
        bad.append("'crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1")
    if p.train_interpolation not in _INTERPOLATIONS:
        bad.append(f"'train_interpolation' must be one of {list(_INTERPOLATIONS)}, not {p.train_interpolation!r}")
    if p.rand_augment and (problem := rand_augment_problem(p.rand_augment)):
        bad.append(f"'rand_augment' = {p.rand_augment!r} {problem}")
    if p.color_jitter < 0:
        bad.append("'color_jitter' must be >= 0 (0 = none)")
    if not 0 <= p.random_erasing <= 1 or p.re_count < 1 or p.re_mode not in _RE_MODES:
        bad.append(f"'random_erasing' must be in [0, 1], 're_count' >= 1 and 're_mode' one of {list(_RE_MODES)}")
    if p.mixup < 0 or p.cutmix < 0:
        bad.append("'mixup' and 'cutmix' (Beta alphas) must be >= 0 (0 = off)")
    if not 0 <= p.mixup_prob <= 1 or not 0 <= p.mixup_switch_prob <= 1:
        bad.append("'mixup_prob' and 'mixup_switch_prob' must be in [0, 1]")
    if p.mixup_mode not in _MIXUP_MODES:
        bad.append(f"'mixup_mode' must be one of {list(_MIXUP_MODES)}, not {p.mixup_mode!r}")
    if not 0 <= p.drop_path < 1:
        bad.append("'drop_path' must be in [0, 1)")
    if p.finetune_head_layer not in (0, 1):
        bad.append("'finetune_head_layer' must be 0 (head on the final-norm CLS) or 1 (on the projection head's "
                   "first layer, as iBOT)")
    elif p.finetune_head_layer == 1 and p.layer != "cls":
        bad.append(f"'finetune_head_layer' = 1 reads the final-norm CLS token the projection head was trained on, "
                   f"so 'layer' must be 'cls', not {p.layer!r}")
    if not 0 < p.val_fraction < 1:
        bad.append("'val_fraction' must be in (0, 1)")
    if bad:
        raise CardError(f"Card {spec.card!r}: protocol field(s) {'; '.join(bad)}")


class Classifier(nn.Module):
    """A trainable copy of a backbone with a linear head: images [N, 3, H, W] -> logits [N, C].

    ``neck``: optional trainable module between the backbone's ``layer`` features and the head (the projection
    head's first layer for ``finetune_head_layer = 1``); the head then reads its output width.
    """

    def __init__(self, backbone: BackboneFace, num_classes: int, layer: str, seed: int,
                 neck: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone.trainable_copy()  # the network alone, unfrozen; ``backbone`` stays as it is
        self.layer = layer
        self.neck = neck if neck is not None else nn.Identity()
        widths = [m.out_features for m in self.neck.modules() if isinstance(m, nn.Linear)]
        self.head = nn.Linear(widths[-1] if widths else self.backbone.layer_dim(layer), num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # DINO LinearClassifier init (and DINO issue #31: small init for the new layer)
            self.head.weight.normal_(0.0, 0.01, generator=gen)
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone.features(images, self.layer)))


_HEAD_FALLBACK_WARNED: set[str] = set()


def head_neck(backbone: BackboneFace, p: FinetuneParams, desc: str) -> tuple[nn.Module | None, int]:
    """The module the classifier head sits on for ``p.finetune_head_layer`` and the layer actually used: 1 needs a
    projection head (checkpoints of the suite's pretraining); without one, 0 with one warning per model."""
    if p.finetune_head_layer == 0:
        return None, 0
    first = getattr(backbone, "projector_first_layer", None)
    neck = first() if callable(first) and getattr(backbone, "has_projector", False) else None
    if neck is not None:
        return neck, 1
    name = str(getattr(backbone.spec, "name", desc))
    if name not in _HEAD_FALLBACK_WARNED:
        _HEAD_FALLBACK_WARNED.add(name)
        log.warning("%s: finetune_head_layer = 1 asks for the projection head's first layer, but %r has no "
                    "projection head (official checkpoints ship the backbone only); the head sits on the "
                    "final-norm CLS token instead (finetune_head_layer 0, recorded in the extras)", desc, name)
    return None, 0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and 1-D parameters (norm scales, tokens, position embeddings), as timm / DeiT."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, warmup: int, base: float, floor: float = 1e-6, start: float | None = None) -> float:
    """Linear warm-up from ``start`` (default ``floor``) to ``base`` over ``warmup`` steps, then cosine to ``floor``
    (DeiT / timm: warmup-lr 1e-6, min-lr 1e-5, DeiT:79-81). Both are capped at ``base``, so a scaled lr at or below
    min-lr stays flat (iBOT's semi-supervised 5e-6 x 1024 / 512 = 1e-5 = min-lr: timm's schedule is flat too)."""
    floor = min(floor, base)
    start = floor if start is None else min(start, base)
    if step < warmup:
        return start + (base - start) * step / max(warmup, 1)
    t = (step - warmup) / max(total - warmup, 1)
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * min(t, 1.0)))


def predict(model: nn.Module, dataset: Any, *, batch_size: int, device: torch.device, num_workers: int = 0,
            amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, C] (float64) and labels [N] of ``dataset`` (items already transformed) under ``model``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    outs, ys = [], []
    with torch.no_grad():
        for images, y in loader:
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                outs.append(model(images.to(device)).double().cpu())
            ys.append(y)
    return torch.cat(outs).numpy(), torch.cat(ys).numpy()


@dataclass
class FinetuneResult:
    model: Classifier
    best_epoch: int
    val_top1: float
    val_nll: float
    history: list[dict[str, float]]
    recipe: dict[str, Any]  # what ran: transform repr, Mixup settings, loss, drop-path rates, head layer used


def finetune(backbone: BackboneFace, train_set: Any, train_labels: np.ndarray, num_classes: int, params: FinetuneParams,
             *, seed: int, device: torch.device, num_workers: int = 0, precision: str = "fp32",
             desc: str = "finetune") -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` + a linear head on ``train_set`` (an ImageDataset, labels [N]).

    ``params.val_fraction`` of each class (at least one when it has two or more) is held out; the weights of the
    epoch with the best held-out top-1 are returned. The backbone itself is never modified.
    """
    with _seeded_global_rngs(seed):
        return _finetune(backbone, train_set, train_labels, num_classes, params, seed=seed, device=device,
                         num_workers=num_workers, precision=precision, desc=desc)


def _finetune(backbone: BackboneFace, train_set: Any, train_labels: np.ndarray, num_classes: int,
              p: FinetuneParams, *, seed: int, device: torch.device, num_workers: int, precision: str,
              desc: str) -> FinetuneResult:
    if precision not in PRECISIONS:
        raise ProsminBenchError(f"Expected precision 'fp32', 'bf16' or 'fp16', but got {precision!r}")
    amp = PRECISIONS[precision]
    fit_idx, val_idx = stratified_holdout(np.asarray(train_labels), p.val_fraction, seed)
    if len(val_idx) == 0:
        raise ProsminBenchError(
            f"{desc}: no class has two training examples, so nothing can be held out to choose the epoch"
        )
    gen = torch.Generator().manual_seed(seed)
    neck, head_layer = head_neck(backbone, p, desc)
    model = Classifier(backbone, num_classes, p.layer, seed, neck=neck).to(device)
    drop_rates = set_drop_path(model.backbone.net, p.drop_path) if p.drop_path > 0 else []
    if p.drop_path > 0 and not drop_rates:
        log.info("%s: no timm ViT blocks in %r, so no stochastic depth (drop_path %g not applied)", desc,
                 getattr(backbone.spec, "name", ""), p.drop_path)
    train_tf = train_transform(backbone, p)
    mixup = build_mixup(p, num_classes)
    soft_ce = SoftTargetCrossEntropy()
    fit_ds = torch.utils.data.Subset(train_set.with_transform(train_tf), fit_idx.tolist())
    val_ds = torch.utils.data.Subset(train_set.with_transform(backbone.transform), val_idx.tolist())
    bs = min(p.batch_size, len(fit_idx))
    if mixup is not None and bs < 2:
        raise ProsminBenchError(f"{desc}: Mixup / CutMix needs batches of at least 2 images, but only {len(fit_idx)} "
                                "remain for training; set mixup = 0 and cutmix = 0 or use more data")
    # timm's Mixup mixes a batch with its reverse and needs an even batch. DeiT drops the last incomplete batch
    # (drop_last=True, DeiT:241, iBOT-semi:667); at the mini scale that would leave out up to half the labelled
    # images every epoch, so the last batch is kept and, when odd, loses one image (a different one each epoch, as
    # the order is reshuffled).
    loader = torch.utils.data.DataLoader(fit_ds, batch_size=bs, shuffle=True, generator=gen, drop_last=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    total = p.epochs * steps_per_epoch
    base_lr = p.lr * bs / 512.0  # DeiT linear scaling rule: lr x batch / 512
    opt = torch.optim.AdamW(_param_groups(model, p.weight_decay), lr=base_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    recipe = {
        "train_transform": repr(train_tf),
        "mixup": None if mixup is None else {
            "mixup_alpha": p.mixup, "cutmix_alpha": p.cutmix, "prob": p.mixup_prob, "switch_prob": p.mixup_switch_prob,
            "mode": p.mixup_mode, "label_smoothing": p.label_smoothing, "num_classes": num_classes},
        "loss": "timm SoftTargetCrossEntropy" if mixup is not None else
                f"cross-entropy, label smoothing {p.label_smoothing}",
        "drop_path_per_block": drop_rates,
        "finetune_head_layer_used": head_layer,
        "batch_size": bs, "scaled_lr": base_lr,
    }
    best: tuple[float, float] = (-1.0, math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    history: list[dict[str, float]] = []
    step = 0
    for epoch in progress.bar(range(1, p.epochs + 1), desc=desc, unit="epoch"):
        model.train()
        running = 0.0
        for images, y in loader:
            lr = _lr_at(step, total, p.warmup_epochs * steps_per_epoch, base_lr, floor=p.min_lr, start=p.warmup_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            step += 1
            images, y = images.to(device), y.to(device)
            if mixup is not None:
                even = len(y) - len(y) % 2
                if even == 0:  # a last batch of one image: nothing to mix it with
                    continue
                images, target = mixup(images[:even], y[:even])
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                logits = model(images)
                if mixup is not None:
                    loss = soft_ce(logits.float(), target)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=p.label_smoothing)
            if not torch.isfinite(loss):
                raise ProsminBenchError(f"{desc}: the fine-tuning loss became {loss.item()} at epoch {epoch}; "
                                        "lower the protocol's lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running += float(loss.detach())
        if epoch % p.eval_every and epoch != p.epochs:
            continue
        logits, yv = predict(model, val_ds, batch_size=bs, device=device, num_workers=num_workers, amp=amp)
        probs = softmax(logits)
        top1 = float((probs.argmax(1) == yv).mean())
        nll = float(-np.log(np.clip(probs[np.arange(len(yv)), yv], 1e-12, None)).mean())
        history.append({"epoch": epoch, "train_loss": running / max(steps_per_epoch, 1), "val_top1": top1,
                        "val_nll": nll})
        log.debug("%s epoch %d: loss %.4f held-out top1 %.4f nll %.4f", desc, epoch, history[-1]["train_loss"],
                  top1, nll)
        if (top1, -nll) > (best[0], -best[1]):
            best = (top1, nll)
            best_epoch = epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if best_state is None:  # unreachable: the last epoch is always evaluated and any top-1 beats -1
        raise ProsminBenchError(f"{desc}: no epoch was evaluated on the held-out data")
    model.load_state_dict(best_state, strict=True)
    model.eval()
    return FinetuneResult(model, best_epoch, best[0], best[1], history, recipe)
