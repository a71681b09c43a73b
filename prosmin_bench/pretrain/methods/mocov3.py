"""MoCo v3 (Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021;
github.com/facebookresearch/moco-v3).

Base encoder: backbone -> projector (3-layer MLP with BN: Linear, BN, ReLU, Linear, BN, ReLU, Linear, BN without
affine; hidden 4096, out 256) -> predictor (2-layer MLP: Linear, BN, ReLU, Linear, BN without affine). Momentum
encoder: backbone -> projector, EMA of the base encoder (momentum 0.99 -> 1, half-cycle cosine, ``--moco-m-cos``).
Two views; loss = ctr(q1, k2) + ctr(q2, k1) with ctr(q, k) = 2 tau * CrossEntropy(normalize(q) normalize(k)^T /
tau, positives on the diagonal): InfoNCE against every key of the global batch (keys all-gathered across
processes, no gradient), temperature tau = 0.2 for ViTs (``moco/builder.py``, ``main_moco.py``, CONFIG.md).

ViT specifics of the official recipe (``vits.py``, CONFIG.md ``--stop-grad-conv1``): a fixed 2-D sin-cos position
embedding, MoCo-v3's weight initialisation and a frozen (random) patch projection, all three knobs here. The
evaluated backbone of this suite's checkpoint is the base (online) encoder, as MoCo-v3's own ``main_lincls.py`` and
the official-weights converter take it (``models.converters``); the other methods are evaluated through their EMA
target.
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
class MoCoV3Config(MethodConfig):
    """MoCo-v3's knobs; defaults are the ViT values of ``main_moco.py`` / CONFIG.md."""

    momentum_start: float = 0.99  # --moco-m 0.99, --moco-m-cos: half-cycle cosine to 1
    momentum_end: float = 1.0
    drop_path_rate: float = 0.0  # vits.py: MoCo-v3 ViTs use no stochastic depth
    dim: int = 256  # --moco-dim
    mlp_dim: int = 4096  # --moco-mlp-dim
    temperature: float = 0.2  # --moco-t=.2 for ViTs (CONFIG.md)
    stop_grad_conv1: bool = True  # CONFIG.md ViT recipes: --stop-grad-conv1 (frozen random patch projection)
    sincos_pos_embed: bool = True  # vits.py build_2d_sincos_position_embedding (fixed, not learned)
    mocov3_init: bool = True  # vits.py VisionTransformerMoCo.__init__ lines 31-47 (the projection it freezes)
    weight_decay_all: bool = True  # main_moco.py: torch AdamW(model.parameters()) decays every parameter


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """MoCo-v3 ``contrastive_loss``: 2 tau * CE(normalize(q) @ normalize(k).T / tau, labels = offset + arange(N)).

    Args:
        q: [N, d] queries of this process; k: [M, d] keys of the whole batch (M >= N); offset: index in ``k`` of
            this process's first positive (``rank * N``).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


@METHODS.register("mocov3")
class MoCoV3(PretrainMethod):
    """MoCo v3 (see the module docstring). Logs: ``acc`` (fraction of queries whose own key scores highest among
    the batch's keys), ``target_std`` (per-dimension std of the normalised keys over the batch: near 0 means
    collapse)."""

    name = "mocov3"
    config_class = MoCoV3Config
    min_global_crops = 2
    uses_local_crops = False  # MoCo-v3 uses two views of each image

    def __init__(self, config: MoCoV3Config, *, backbone_factory: BackboneFactory, crops: MultiCropConfig) -> None:
        super().__init__(config, crops=crops)
        c = config
        if crops.global_crops != 2:
            raise ConfigError(f"MoCo-v3 is a two-view method: set crops.global_crops=2 (got {crops.global_crops})")
        if c.temperature <= 0:
            raise ConfigError(f"Expected method.temperature > 0, but got {c.temperature}")
        # base encoder (+ predictor) and momentum encoder, projectors and predictor MLPs (models/networks.py)
        self.online, self.target = build_networks(self.name, c, backbone_factory)
        self.configure_backbone()
        self.init_target_from_online()

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.config.weight_decay_all:
            return super().param_groups()
        return [{"params": [p for _, p in self.trainable_named_parameters()], "apply_wd": True}]

    def forward(self, batch: MultiCropBatch, progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        x1, x2 = batch.global_views
        b = x1.shape[0]
        # one pass per view, as moco/builder.py: the BN layers normalise each view's batch on its own
        q1, q2 = self.online(x1), self.online(x2)
        with torch.no_grad():
            k1, k2 = self.target(x1).float(), self.target(x2).float()
            k1_all = distributed.all_gather_varlen(k1.contiguous())  # [global batch, dim], rank order
            k2_all = distributed.all_gather_varlen(k2.contiguous())
        offset = distributed.rank() * b
        with torch.autocast(device_type=q1.device.type, enabled=False):
            loss = info_nce(q1.float(), k2_all, c.temperature, offset) + info_nce(q2.float(), k1_all, c.temperature,
                                                                                offset)
        with torch.no_grad():
            sim = F.normalize(q1.float(), dim=1) @ F.normalize(k2_all, dim=1).T
            acc = (sim.argmax(dim=1) == torch.arange(b, device=sim.device) + offset).float().mean()
            std = F.normalize(k1, dim=1).std(dim=0).mean()
        return loss, {"acc": acc, "target_std": std}
