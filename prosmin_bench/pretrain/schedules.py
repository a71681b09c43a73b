"""Per-step numbers of the pretraining loop: the lr and weight-decay schedules (DINO ``utils.cosine_scheduler``),
the autocast precision, and DINO's per-parameter gradient clipping."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .config import ConfigError, PretrainConfig


@dataclass(frozen=True)
class Schedules:
    """Per-step values (DINO ``utils.cosine_scheduler``), as functions of the 0-based step."""

    base_lr: float  # peak lr after linear scaling, lr * batch / 256
    min_lr: float
    warmup_steps: int
    wd_start: float
    wd_end: float
    total_steps: int

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:  # linear warm-up; starts at base/W rather than DINO's 0 (no wasted step)
            return self.base_lr * (step + 1) / self.warmup_steps
        n = max(self.total_steps - self.warmup_steps, 1)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * (step - self.warmup_steps) / n))

    def weight_decay(self, step: int) -> float:
        return self.wd_end + 0.5 * (self.wd_start - self.wd_end) * (1 + math.cos(math.pi * step / max(self.total_steps, 1)))


def make_schedules(cfg: PretrainConfig, steps_per_epoch: int) -> Schedules:
    o = cfg.optim
    total = o.epochs * steps_per_epoch
    return Schedules(
        base_lr=o.lr * o.batch_size / 256.0, min_lr=o.min_lr,
        warmup_steps=min(int(round(o.warmup_epochs * steps_per_epoch)), total),
        wd_start=o.weight_decay, wd_end=o.weight_decay_end, total_steps=total,
    )


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU (bf16 autocast on most CPUs is
    slower than fp32)."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"Expected run.precision auto|bf16|fp16|fp32, but got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def clip_gradients_per_parameter(params: list[torch.nn.Parameter], clip: float) -> float:
    """DINO / released ProSMin ``utils.clip_gradients``: scale each parameter's gradient to norm <= ``clip``
    (per parameter, not the global norm). Returns the global gradient norm before clipping (for the log)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if clip > 0:
        coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return total
