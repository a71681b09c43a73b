"""DINO: self-distillation with no labels (Caron et al., ICCV 2021; github.com/facebookresearch/dino).

Student: backbone -> DINO projection head (3-layer MLP, L2-normalised bottleneck, weight-normalised last layer
to K outputs) on every view (global + local). Teacher: the same network, updated only by EMA of the student
(momentum 0.996 -> 1, cosine), run on the global views only. The teacher's outputs are centred (centre = EMA of
their batch mean, momentum 0.9) and sharpened (teacher temperature 0.04, optionally warmed up to 0.07); the loss
is the cross-entropy between the teacher's softmax and the student's log-softmax (student temperature 0.1),
averaged over every (teacher global view, student view) pair of different views (``main_dino.py`` ``DINOLoss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ... import distributed
from ...models.networks import build_networks
from ..config import ConfigError, MultiCropConfig
from .base import METHODS, BackboneFactory, MethodConfig, MultiCropBatch, PretrainMethod, Progress


@dataclass(frozen=True)
class DINOConfig(MethodConfig):
    """DINO's knobs; defaults are ``main_dino.py``'s defaults and the paper's ViT-S/16 values."""

    momentum_start: float = 0.996  # main_dino.py --momentum_teacher, cosine to 1
    momentum_end: float = 1.0
    drop_path_rate: float = 0.1  # main_dino.py --drop_path_rate (student only)
    out_dim: int = 65536  # K, main_dino.py --out_dim (paper, ViT-S)
    head_hidden_dim: int = 2048  # DINOHead
    head_bottleneck_dim: int = 256  # DINOHead
    head_nlayers: int = 3  # DINOHead
    head_use_bn: bool = False  # main_dino.py --use_bn_in_head False
    norm_last_layer: bool = True  # main_dino.py --norm_last_layer True (README "boost" for ViT-S: False)
    student_temp: float = 0.1  # DINOLoss student_temp
    teacher_temp_start: float = 0.04  # main_dino.py --warmup_teacher_temp
    teacher_temp: float = 0.04  # main_dino.py --teacher_temp (README "boost": 0.07)
    teacher_temp_warmup_epochs: int = 0  # main_dino.py --warmup_teacher_temp_epochs (default 0; "boost": 30)
    center_momentum: float = 0.9  # DINOLoss center_momentum


def teacher_temperature(start: float, end: float, warmup_epochs: int, epoch: int) -> float:
    """DINO's schedule: ``np.linspace(start, end, warmup_epochs)`` over the first epochs, then ``end``."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """DINO's multi-view loss.

    Args:
        student_logits: [V, b, K] student outputs already divided by the student temperature (V >= G views,
            the first G being the global views in the teacher's order).
        teacher_probs: [G, b, K] centred, sharpened teacher softmax.
    Returns:
        (mean over the pairs (q, v) with v != q of mean_b [ -sum_k p_q log softmax(s_v) ], number of pairs).
    """
    n_glob, n_views = teacher_probs.shape[0], student_logits.shape[0]
    logp = F.log_softmax(student_logits, dim=-1)  # [V, b, K]
    # every (teacher view q, student view v) cross-entropy at once: [G, V]
    ce = -torch.einsum("gbk,vbk->gv", teacher_probs, logp) / student_logits.shape[1]
    mask = torch.ones(n_glob, n_views, dtype=torch.bool, device=ce.device)
    idx = torch.arange(min(n_glob, n_views), device=ce.device)
    mask[idx, idx] = False
    n_pairs = int(mask.sum())
    return ce[mask].sum() / n_pairs, n_pairs


@METHODS.register("dino")
class DINO(PretrainMethod):
    """DINO (see the module docstring). Logs: ``teacher_temp``, ``teacher_entropy`` (mean entropy of the
    teacher's softmax: ln K means uniform outputs, 0 means one-hot), ``kl`` (loss minus that entropy, i.e. the mean
    KL between teacher and student: both near 0 with entropy near ln K is the uniform collapse), ``target_std``
    (mean per-dimension std of the teacher outputs over the batch: near 0 means constant outputs)."""

    name = "dino"
    config_class = DINOConfig

    def __init__(self, config: DINOConfig, *, backbone_factory: BackboneFactory, crops: MultiCropConfig) -> None:
        super().__init__(config, crops=crops)
        c = config
        for field_name in ("student_temp", "teacher_temp", "teacher_temp_start"):
            if getattr(c, field_name) <= 0:
                raise ConfigError(f"Expected method.{field_name} > 0, but got {getattr(c, field_name)}")
        if not 0.0 <= c.center_momentum < 1.0:
            raise ConfigError(f"Expected method.center_momentum in [0, 1), but got {c.center_momentum}")
        # student and teacher: backbone -> DINO head (models/networks.py); main_dino.py: the teacher has no drop path
        self.online, self.target = build_networks(self.name, c, backbone_factory)
        self.configure_backbone()
        self.init_target_from_online()
        self.register_buffer("center", torch.zeros(1, c.out_dim))

    def teacher_temp_at(self, progress: Progress) -> float:
        c = self.config
        return teacher_temperature(c.teacher_temp_start, c.teacher_temp, c.teacher_temp_warmup_epochs, progress.epoch)

    def forward(self, batch: MultiCropBatch, progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        b, n_glob, views = batch.batch_size, len(batch.global_views), batch.views
        temp = self.teacher_temp_at(progress)
        with torch.no_grad():
            t_raw = self.target.forward_views(batch.global_views).float()  # [G * b, K]
            t_probs = F.softmax((t_raw - self.center) / temp, dim=-1).reshape(n_glob, b, -1)
        s_out = self.online.forward_views(views)
        with torch.autocast(device_type=s_out.device.type, enabled=False):  # the loss in float32
            s_logits = (s_out.float() / c.student_temp).reshape(len(views), b, -1)
            loss, _ = dino_cross_entropy(s_logits, t_probs)
        self.update_center(t_raw)
        with torch.no_grad():
            entropy = -(t_probs * torch.log(t_probs.clamp_min(1e-12))).sum(-1).mean()
        return loss, {
            "teacher_temp": temp,
            "teacher_entropy": entropy,
            "kl": loss.detach() - entropy,
            "target_std": t_raw.reshape(n_glob, b, -1).std(dim=1).mean(),
        }

    @torch.no_grad()
    def update_center(self, t_raw: torch.Tensor) -> None:
        """centre <- m * centre + (1 - m) * mean of the raw teacher outputs over the global batch (all ranks)."""
        batch_mean = distributed.all_reduce_mean(t_raw.mean(dim=0, keepdim=True))
        m = self.config.center_momentum
        self.center.mul_(m).add_(batch_mean, alpha=1.0 - m)
