"""iBOT: image BERT pre-training with an online tokenizer (Zhou et al., ICLR 2022; github.com/bytedance/ibot).

DINO's self-distillation on the [CLS] token plus masked image modelling by self-distillation on patch tokens:
the student sees the global views with blocks of patches replaced by a learned mask token and must predict, at
the masked positions, the teacher's (centred, sharpened) distribution for the same patch of the unmasked view.
Loss = lambda1 * DINO loss on [CLS] over cross-view pairs + lambda2 * mean over global views of the per-image
mean, over masked patches, of the patch cross-entropy (``main_ibot.py`` ``iBOTLoss``). Teacher = EMA of the
student (momentum 0.996 -> 1); separate centres for [CLS] and patch outputs (momentum 0.9).

Masks follow ``loader.py`` ``ImageFolderMask``: per view a prediction ratio (one of ``pred_ratio``, each with
uniform jitter ``pred_ratio_var``), then BEiT's block-wise masking (rectangles of area >= (min(H, W) // 3)^2 and
log-uniform aspect ratio in ``pred_aspect_ratio``, added until the ratio is reached) or, with
``pred_shape="rand"``, that many random patches. The draws for an image come from its own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import distributed
from ...models.networks import build_networks, multicrop_features
from ..config import ConfigError, MultiCropConfig
from ..rng import SampleRNG
from .base import METHODS, BackboneFactory, MethodConfig, MultiCropBatch, PretrainMethod, Progress
from .dino import dino_cross_entropy, teacher_temperature


@dataclass(frozen=True)
class IBOTConfig(MethodConfig):
    """iBOT's knobs; defaults are ``main_ibot.py``'s defaults."""

    momentum_start: float = 0.996  # --momentum_teacher, cosine to 1
    momentum_end: float = 1.0
    drop_path_rate: float = 0.1  # --drop_path (student only)
    out_dim: int = 8192  # --out_dim ([CLS] outputs)
    patch_out_dim: int = 8192  # --patch_out_dim (must equal out_dim when a head is shared)
    shared_head: bool = False  # --shared_head: the student's patch tokens use the [CLS] last layer
    shared_head_teacher: bool = True  # --shared_head_teacher
    head_hidden_dim: int = 2048  # DINOHead
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_use_bn: bool = False  # --norm_in_head None
    norm_last_layer: bool = True  # --norm_last_layer (README ViT-S/16: false)
    student_temp: float = 0.1  # iBOTLoss student_temp
    teacher_temp_start: float = 0.04  # --warmup_teacher_temp
    teacher_temp: float = 0.04  # --teacher_temp (README ViT-S/16: 0.07)
    teacher_patch_temp_start: float = 0.04  # --warmup_teacher_patch_temp
    teacher_patch_temp: float = 0.07  # --teacher_patch_temp
    teacher_temp_warmup_epochs: int = 30  # --warmup_teacher_temp_epochs
    center_momentum: float = 0.9  # iBOTLoss center_momentum
    center_momentum_patch: float = 0.9  # iBOTLoss center_momentum2
    lambda_cls: float = 1.0  # --lambda1
    lambda_patch: float = 1.0  # --lambda2
    pred_ratio: tuple[float, ...] = (0.3,)  # --pred_ratio (README ViT-S/16: 0 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0,)  # --pred_ratio_var (README ViT-S/16: 0 0.2)
    pred_aspect_ratio: tuple[float, float] = (0.3, 1.0 / 0.3)  # main_ibot.py pred_aspect_ratio
    pred_shape: str = "block"  # --pred_shape: "block" (BEiT) or "rand"


#: Block masking tries at most this many rectangles per view (BEiT/iBOT: until the ratio is met, 10 attempts per
#: rectangle); the uniform draws for them are made up front from the image's generator.
MASK_ROUNDS = 32
MASK_ATTEMPTS = 10


def block_mask(u: list[float], grid: tuple[int, int], ratio: float, log_aspect: tuple[float, float]) -> torch.Tensor:
    """BEiT/iBOT block-wise mask [H, W] (bool) covering about ``ratio * H * W`` patches, from uniforms ``u``
    (``MASK_ROUNDS * MASK_ATTEMPTS * 4`` values in [0, 1); used in order, so the mask is a function of ``u``)."""
    H, W = grid
    mask = torch.zeros(H, W, dtype=torch.bool)
    goal = ratio * H * W
    low = (min(H, W) // 3) ** 2
    count, k = 0, 0
    for _ in range(MASK_ROUNDS):
        if count >= goal:
            break
        budget = goal - count
        added = 0
        for _ in range(MASK_ATTEMPTS):
            ua, ur, ut, ul = u[k : k + 4]
            k += 4
            area = low + ua * (budget - low)
            aspect = math.exp(log_aspect[0] + ur * (log_aspect[1] - log_aspect[0]))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < W and h < H:
                top = min(int(ut * (H - h + 1)), H - h)
                left = min(int(ul * (W - w + 1)), W - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    added = new
            if added:
                break
        if not added:
            break
        count += added
    return mask


def draw_masks(rng: SampleRNG, n_views: int, grid: tuple[int, int], cfg: IBOTConfig) -> torch.Tensor:
    """Masks for ``n_views`` views of each image of the batch: [n_views, b, H * W] (bool, on the CPU)."""
    n_u = 2 + MASK_ROUNDS * MASK_ATTEMPTS * 4
    u = rng.rand((n_views, n_u), stream="ibot_mask")  # [b, V, n_u]
    H, W = grid
    log_aspect = (math.log(cfg.pred_aspect_ratio[0]), math.log(cfg.pred_aspect_ratio[1]))
    out = torch.zeros(n_views, u.shape[0], H * W, dtype=torch.bool)
    n_ratios = len(cfg.pred_ratio)
    for i, rows in enumerate(u.tolist()):
        for v, row in enumerate(rows):
            j = min(int(row[0] * n_ratios), n_ratios - 1)  # random.choice over the jittered ratios
            ratio = cfg.pred_ratio[j] + (2.0 * row[1] - 1.0) * cfg.pred_ratio_var[j]
            if ratio <= 0:
                continue
            if cfg.pred_shape == "block":
                out[v, i] = block_mask(row[2:], grid, ratio, log_aspect).flatten()
            else:  # "rand": int(ratio * H * W) patches chosen uniformly (a permutation from the uniforms)
                n = int(ratio * H * W)
                order = torch.tensor(row[2 : 2 + H * W]).argsort()
                out[v, i, order[:n]] = True
    return out


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """iBOT's masked-patch self-distillation.

    Args:
        student_logits: [G, b, P, K] student patch outputs of the masked views, divided by the student temperature.
        teacher_probs: [G, b, P, K] teacher softmax of the same (unmasked) views.
        masks: [G, b, P] bool, the masked patches.
    Returns:
        mean_g mean_b [ sum_p m * CE(t, s) / max(sum_p m, 1) ] (images without masked patches count as 0).
    """
    ce = -(teacher_probs * F.log_softmax(student_logits, dim=-1)).sum(-1)  # [G, b, P]
    m = masks.to(ce.dtype)
    per_image = (ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per_image.mean()


def vit_tokens(backbone: nn.Module, images: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """All final-norm tokens of a timm ViT, [N, 1 + P, E], with the patch embeddings of ``mask`` [N, P] (True =
    masked) replaced by ``mask_token`` [1, E] before the position embedding (iBOT ``prepare_tokens``)."""
    if getattr(backbone, "num_prefix_tokens", 1) != 1:
        raise ConfigError("iBOT needs a ViT with exactly one prefix ([CLS]) token and no register tokens")
    x = backbone.patch_embed(images)  # [N, P, E], or [N, h, w, E] with dynamic_img_size
    if mask is not None:
        m = mask.reshape(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(m, mask_token.to(x.dtype), x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    x = backbone.blocks(x)
    return backbone.norm(x)


def patch_grid(backbone: nn.Module, image_size: tuple[int, int] | torch.Size) -> tuple[int, int]:
    """Patch grid (H, W) of a timm ViT for images of ``image_size``."""
    h, w = backbone.patch_embed.dynamic_feat_size(tuple(image_size))
    return int(h), int(w)


@METHODS.register("ibot")
class IBOT(PretrainMethod):
    """iBOT (see the module docstring). Logs: ``cls`` and ``patch`` (the two weighted loss terms),
    ``mask_ratio`` (fraction of masked patches in the global views), ``teacher_entropy`` ([CLS]),
    ``target_std`` (per-dimension std of the teacher's [CLS] outputs over the batch)."""

    name = "ibot"
    config_class = IBOTConfig

    def __init__(self, config: IBOTConfig, *, backbone_factory: BackboneFactory, crops: MultiCropConfig) -> None:
        super().__init__(config, crops=crops)
        c = config
        if len(c.pred_ratio) != len(c.pred_ratio_var) or not c.pred_ratio:
            raise ConfigError(
                f"Expected method.pred_ratio and method.pred_ratio_var of equal, non-zero length, but got "
                f"{c.pred_ratio} and {c.pred_ratio_var}"
            )
        if any(v < 0 or v > r or r + v >= 1.0 for r, v in zip(c.pred_ratio, c.pred_ratio_var)):
            raise ConfigError(f"Expected 0 <= pred_ratio_var <= pred_ratio and ratio + var < 1, got {c.pred_ratio}, "
                              f"{c.pred_ratio_var}")
        if c.pred_shape not in ("block", "rand"):
            raise ConfigError(f"Expected method.pred_shape 'block' or 'rand', but got {c.pred_shape!r}")
        if (c.shared_head or c.shared_head_teacher) and c.patch_out_dim != c.out_dim:
            raise ConfigError("A shared iBOT head gives patch outputs of out_dim: set method.patch_out_dim = out_dim")
        if c.shared_head and not c.shared_head_teacher:
            raise ConfigError("method.shared_head=true needs method.shared_head_teacher=true (the teacher's patch "
                              "layer is the EMA of the student's)")
        # student (backbone, iBOT head, mask token) and teacher (models/networks.py); the teacher has no drop path
        self.online, self.target = build_networks(self.name, c, backbone_factory)
        self.configure_backbone()
        self.init_target_from_online()
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, c.patch_out_dim))

    def temperatures_at(self, progress: Progress) -> tuple[float, float]:
        c = self.config
        return (
            teacher_temperature(c.teacher_temp_start, c.teacher_temp, c.teacher_temp_warmup_epochs, progress.epoch),
            teacher_temperature(c.teacher_patch_temp_start, c.teacher_patch_temp, c.teacher_temp_warmup_epochs,
                                progress.epoch),
        )

    def forward(self, batch: MultiCropBatch, progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        b, n_glob = batch.batch_size, len(batch.global_views)
        glob = torch.cat(batch.global_views)  # [G * b, 3, H, W]
        grid = patch_grid(self.online.backbone, glob.shape[-2:])
        masks = draw_masks(batch.rng, n_glob, grid, c).to(glob.device)  # [G, b, P]
        temp, temp_patch = self.temperatures_at(progress)
        with torch.no_grad():
            t_cls, t_patch = self.target.head.cls_and_patches(vit_tokens(self.target.backbone, glob))
            t_cls, t_patch = t_cls.float(), t_patch.float()  # [G * b, K], [G * b, P, Kp]
            t_cls_p = F.softmax((t_cls - self.center) / temp, dim=-1).reshape(n_glob, b, -1)
            t_patch_p = F.softmax((t_patch - self.center_patch) / temp_patch, dim=-1)
            t_patch_p = t_patch_p.reshape(n_glob, b, *t_patch.shape[1:])
        s_cls, s_patch = self.online.head.cls_and_patches(
            vit_tokens(self.online.backbone, glob, masks.reshape(n_glob * b, -1), self.online.mask_token)
        )
        s_cls_all = [s_cls]
        if batch.local_views:
            s_cls_all.append(self.online.head(multicrop_features(self.online.backbone, batch.local_views)))
        with torch.autocast(device_type=glob.device.type, enabled=False):  # the losses in float32
            s_logits = (torch.cat(s_cls_all).float() / c.student_temp).reshape(-1, b, c.out_dim)
            loss_cls, _ = dino_cross_entropy(s_logits, t_cls_p)
            s_patch_logits = (s_patch.float() / c.student_temp).reshape(n_glob, b, *s_patch.shape[1:])
            loss_patch = ibot_patch_loss(s_patch_logits, t_patch_p, masks)
            loss = c.lambda_cls * loss_cls + c.lambda_patch * loss_patch
        self.update_centers(t_cls, t_patch)
        with torch.no_grad():
            entropy = -(t_cls_p * torch.log(t_cls_p.clamp_min(1e-12))).sum(-1).mean()
        return loss, {
            "cls": c.lambda_cls * loss_cls.detach(),
            "patch": c.lambda_patch * loss_patch.detach(),
            "mask_ratio": masks.float().mean(),
            "teacher_entropy": entropy,
            "target_std": t_cls.reshape(n_glob, b, -1).std(dim=1).mean(),
        }

    @torch.no_grad()
    def update_centers(self, t_cls: torch.Tensor, t_patch: torch.Tensor) -> None:
        """[CLS] centre: EMA of the batch mean; patch centre: EMA of the mean over patches and batch (all ranks)."""
        c = self.config
        cls_mean = distributed.all_reduce_mean(t_cls.mean(dim=0, keepdim=True))
        patch_mean = distributed.all_reduce_mean(t_patch.mean(dim=1).mean(dim=0, keepdim=True)).unsqueeze(0)
        self.center.mul_(c.center_momentum).add_(cls_mean, alpha=1.0 - c.center_momentum)
        self.center_patch.mul_(c.center_momentum_patch).add_(patch_mean, alpha=1.0 - c.center_momentum_patch)
