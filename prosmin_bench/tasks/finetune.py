"""End-to-end fine-tuning of a backbone + linear head: the one loop the semi-supervised and transfer tasks share.

Recipe (DeiT-style fine-tuning, as DINO and iBOT use for transfer and semi-supervised evaluation): a copy of the
backbone, every parameter trainable, a new linear head on the final-norm CLS token (weights N(0, 0.01), zero bias,
DINO's classifier init); AdamW, no weight decay on biases and 1-D parameters (norms, tokens), learning rate scaled
by batch / 512 (DeiT's rule), linear warm-up then cosine decay per step; cross-entropy with label smoothing; train
augmentation RandomResizedCrop + optional horizontal flip; evaluation with the model's own eval transform.
Model selection: the epoch with the best top-1 on a stratified held-out part of the training data (ties: lower
NLL); the test set is used once, at the end. Not implemented from the DeiT recipe (documented in the cards):
RandAugment, Mixup/CutMix, repeated augmentation, random erasing, stochastic depth.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm.auto import tqdm

from ..errors import CardError, ProsminBenchError
from ..settings import PRECISIONS
from .base import BackboneFace
from .probes import softmax, stratified_holdout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tuning hyperparameters; the ImageNet-scale values in the cards come from DINO / iBOT (sources there)."""

    epochs: int = 100
    batch_size: int = 768  # DINO issue #81 / iBOT run.sh: 96 per GPU x 8
    lr: float = 7.5e-6  # per batch 512 (DeiT scaling); iBOT run.sh transfer on CIFAR / Flowers
    weight_decay: float = 0.05  # DeiT / DINO issue #81
    warmup_epochs: int = 5  # DINO issue #81
    label_smoothing: float = 0.1  # DeiT default (DINO issue #144)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale (torchvision / DeiT default)
    hflip: bool = True  # natural images; off for digits (not flip-invariant)
    layer: str = "cls"  # the head reads the final-norm CLS token
    val_fraction: float = 0.1  # held-out part of the training data for choosing the epoch
    eval_every: int = 1  # epochs between held-out evaluations (the last epoch is always evaluated)
    n_bins: int = 15  # ECE bins (Guo et al. 2017)


def check_finetune_params(spec: Any, p: FinetuneParams) -> None:
    bad = []
    if p.epochs < 1 or p.batch_size < 1 or p.eval_every < 1:
        bad.append("'epochs', 'batch_size' and 'eval_every' must be >= 1")
    if p.lr <= 0 or p.weight_decay < 0 or p.warmup_epochs < 0:
        bad.append("'lr' must be > 0, 'weight_decay' and 'warmup_epochs' >= 0")
    if not 0 <= p.label_smoothing < 1:
        bad.append("'label_smoothing' must be in [0, 1)")
    if len(p.crop_scale) != 2 or not 0 < p.crop_scale[0] <= p.crop_scale[1] <= 1:
        bad.append("'crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1")
    if not 0 < p.val_fraction < 1:
        bad.append("'val_fraction' must be in (0, 1)")
    if bad:
        raise CardError(f"Card {spec.card!r}: protocol field(s) {'; '.join(bad)}")


class Classifier(nn.Module):
    """A trainable copy of a backbone with a linear head: images [N, 3, H, W] -> logits [N, C]."""

    def __init__(self, backbone: BackboneFace, num_classes: int, layer: str, seed: int) -> None:
        super().__init__()
        self.backbone = backbone.trainable_copy()  # the network alone, unfrozen; ``backbone`` stays as it is
        self.layer = layer
        self.head = nn.Linear(self.backbone.layer_dim(layer), num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # DINO LinearClassifier init (and DINO issue #31: small init for the new layer)
            self.head.weight.normal_(0.0, 0.01, generator=gen)
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.features(images, self.layer))


def train_transform(model: BackboneFace, crop_scale: tuple[float, float], hflip: bool):
    """RandomResizedCrop to the model's crop size (+ flip) + the model's normalisation."""
    pre = model.spec.preprocess
    ops: list[Any] = [T.RandomResizedCrop(pre.crop, scale=tuple(crop_scale),
                                          interpolation=T.InterpolationMode(pre.interpolation))]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(ops)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and 1-D parameters (norm scales, tokens, position embeddings), as timm / DeiT."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, warmup: int, base: float, floor: float = 1e-6) -> float:
    """Linear warm-up from ``floor`` to ``base`` over ``warmup`` steps, then cosine to ``floor`` (DeiT's schedule
    uses warmup-lr 1e-6 and min-lr 1e-5/1e-6; ``floor`` is capped at base so tiny lrs still decay)."""
    floor = min(floor, base)
    if step < warmup:
        return floor + (base - floor) * step / max(warmup, 1)
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


def finetune(backbone: BackboneFace, train_set: Any, train_labels: np.ndarray, num_classes: int, params: FinetuneParams,
             *, seed: int, device: torch.device, num_workers: int = 0, precision: str = "fp32",
             desc: str = "finetune") -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` + a linear head on ``train_set`` (an ImageDataset, labels [N]).

    ``params.val_fraction`` of each class (at least one when it has two or more) is held out; the weights of the
    epoch with the best held-out top-1 are returned. The backbone itself is never modified.
    """
    p = params
    if precision not in PRECISIONS:
        raise ProsminBenchError(f"Expected precision 'fp32', 'bf16' or 'fp16', but got {precision!r}")
    amp = PRECISIONS[precision]
    fit_idx, val_idx = stratified_holdout(np.asarray(train_labels), p.val_fraction, seed)
    if len(val_idx) == 0:
        raise ProsminBenchError(
            f"{desc}: no class has two training examples, so nothing can be held out to choose the epoch"
        )
    gen = torch.Generator().manual_seed(seed)
    model = Classifier(backbone, num_classes, p.layer, seed).to(device)
    train_tf = train_transform(backbone, p.crop_scale, p.hflip)
    fit_ds = torch.utils.data.Subset(train_set.with_transform(train_tf), fit_idx.tolist())
    val_ds = torch.utils.data.Subset(train_set.with_transform(backbone.transform), val_idx.tolist())
    bs = min(p.batch_size, len(fit_idx))
    loader = torch.utils.data.DataLoader(fit_ds, batch_size=bs, shuffle=True, generator=gen, drop_last=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    total = p.epochs * steps_per_epoch
    base_lr = p.lr * bs / 512.0  # DeiT linear scaling rule: lr x batch / 512
    opt = torch.optim.AdamW(_param_groups(model, p.weight_decay), lr=base_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    best: tuple[float, float] = (-1.0, math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    history: list[dict[str, float]] = []
    step = 0
    progress = sys.stderr.isatty()
    for epoch in tqdm(range(1, p.epochs + 1), desc=desc, disable=not progress, leave=False):
        model.train()
        running = 0.0
        for images, y in loader:
            lr = _lr_at(step, total, p.warmup_epochs * steps_per_epoch, base_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(images.to(device)), y.to(device), label_smoothing=p.label_smoothing)
            if not torch.isfinite(loss):
                raise ProsminBenchError(f"{desc}: the fine-tuning loss became {loss.item()} at epoch {epoch}; "
                                        "lower the protocol's lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running += float(loss.detach())
            step += 1
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
    return FinetuneResult(model, best_epoch, best[0], best[1], history)
