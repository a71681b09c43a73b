"""ProSMin: probabilistic self-supervised learning by scoring-rule minimisation (Vahidi et al., ICLR 2024).

Online network: backbone -> DINO projection head -> probabilistic predictor giving a diagonal Gaussian
(mu, sigma). Target network: backbone -> projection head, updated only by EMA of the online weights (cosine
momentum schedule 0.9 -> 1, released code ``--momentum_target``); its output on the global views is centred
by an EMA of its batch mean. r reparameterised samples z = mu + sigma * eps per online view are scored against
each target view with a proper scoring rule (``losses.py``), averaged over (online view, target view) pairs.
The two networks are defined with the models (``models/networks.py``), which rebuild them from a checkpoint.

Differences from the released code (``amirvhd/SSL-sore-rule``), which docs/protocols.md lists as bugs: the target is
its own backbone (the code wraps the online backbone, which ties the two); the centre is updated with the raw
target outputs (the code updates it from already-centred outputs, whose fixed point is half the mean); nothing
assumes CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ... import distributed
from ...models.networks import build_networks
from ..config import ConfigError, MultiCropConfig
from ..losses import DISTANCES, multiview_energy_score, multiview_kernel_score
from .base import METHODS, BackboneFactory, MethodConfig, MultiCropBatch, PretrainMethod, Progress


@dataclass(frozen=True)
class ProSMinConfig(MethodConfig):
    """ProSMin's knobs; defaults from the paper / released code (docs/protocols.md "ProSMin")."""

    momentum_start: float = 0.9  # released code --momentum_target 0.9, cosine to 1
    momentum_end: float = 1.0
    drop_path_rate: float = 0.1  # paper / released code --drop_path_rate
    out_dim: int = 12000  # K, released code --out_dim
    head_hidden_dim: int = 2048  # DINO head
    head_bottleneck_dim: int = 256  # DINO head
    head_nlayers: int = 3  # DINO head
    head_use_bn: bool = False  # released code --use_bn_in_head False (the paper's "with BN" row is an ablation)
    norm_last_layer: bool = False  # released code: "we don't use normalization in our experiments"
    predictor_hidden_dim: int = 12000  # paper: two-layer MLP, hidden 12000
    predictor_normalize: bool = True  # released code: L2-normalise + ReLU before the mu / log-variance heads
    n_samples: int = 4  # r, paper and released code
    score: str = "energy"  # "energy" (paper's best, Table 3) or "kernel"
    distance: str = "l1"  # paper Table 3 best row "Energy (L1 loss)"; released code F.l1_loss
    beta: float = 1.0  # paper
    lam: float = 1.0 / 2.2  # released code lam_code = 2.4 <=> paper lam = 1 / 2.2 (docs/protocols.md)
    gamma: float = 1.0  # Gaussian kernel bandwidth (kernel score only)
    loss_scale: float = 1.0  # constant factor; the released loss is 22 x energy_score(lam=1/2.2, l1)
    center_momentum: float = 0.9  # docs/protocols.md: centre = EMA of the target's batch mean, momentum 0.9
    include_same_view: bool = True  # released code scores a global view against itself too (DINO does not)


@METHODS.register("prosmin")
class ProSMin(PretrainMethod):
    """ProSMin (see the module docstring). Logs: ``s1``, ``s2`` (the score's two parts, loss = lam * s1 +
    (1 - lam) * s2 before ``loss_scale``), ``sigma`` (mean predicted sigma), ``target_std`` (mean per-dimension
    std of the centred target outputs over the batch: near 0 means collapse)."""

    name = "prosmin"
    config_class = ProSMinConfig

    def __init__(self, config: ProSMinConfig, *, backbone_factory: BackboneFactory, crops: MultiCropConfig) -> None:
        super().__init__(config, crops=crops)
        c = config
        if c.score not in ("energy", "kernel"):
            raise ConfigError(f"Expected method.score 'energy' or 'kernel', but got {c.score!r}")
        if c.distance not in DISTANCES:
            raise ConfigError(f"Expected method.distance 'l1' or 'l2', but got {c.distance!r}")
        if c.n_samples < 2:
            raise ConfigError(f"Expected method.n_samples >= 2 (the unbiased estimate needs two), got {c.n_samples}")
        if not c.include_same_view and crops.n_views < 2:
            raise ConfigError("method.include_same_view=false leaves no pairs with a single view; add crops")
        # online: backbone -> DINO head -> probabilistic predictor; target: backbone -> DINO head (models/networks.py)
        self.online, self.target = build_networks(self.name, c, backbone_factory)
        self.configure_backbone()
        self.init_target_from_online()
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        n_views, n_glob = crops.n_views, crops.global_crops
        mask = torch.ones(n_views, n_glob, dtype=torch.bool)
        if not c.include_same_view:
            mask[torch.arange(n_glob), torch.arange(n_glob)] = False
        self.register_buffer("pair_mask", mask, persistent=False)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"center": self.center.detach().clone()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"center"}:
            raise RuntimeError(f"expected ProSMin extra state {{'center'}}, got {sorted(state)}")
        with torch.no_grad():
            self.center.copy_(state["center"])

    def forward(self, batch: MultiCropBatch, progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        b, n_glob, views = batch.batch_size, len(batch.global_views), batch.views
        n_views, r, K = len(views), c.n_samples, c.out_dim
        with torch.no_grad():
            t_raw = self.target.forward_views(batch.global_views).float()  # [G * b, K]
            targets = (t_raw - self.center).reshape(n_glob, b, K)
        mu, sigma = self.online.forward_views(views)
        device = mu.device
        with torch.autocast(device_type=device.type, enabled=False):  # the score in float32
            mu = mu.float().reshape(n_views, b, K)
            sigma = sigma.float().reshape(n_views, b, K)
            # eps per image from its own generator: independent of batch split, world size and resumption
            eps = batch.rng.randn((n_views, r, K), stream="prosmin_eps", device=device).permute(1, 2, 0, 3)
            z = mu[:, None] + sigma[:, None] * eps  # [V, r, b, K]
            if c.score == "energy":
                loss, s1, s2 = multiview_energy_score(z, targets, beta=c.beta, lam=c.lam, distance=c.distance,
                                                      pairs=self.pair_mask)
            else:
                loss, s1, s2 = multiview_kernel_score(z, targets, gamma=c.gamma, lam=c.lam, pairs=self.pair_mask)
            loss = c.loss_scale * loss
        self.update_center(t_raw)
        logs = {
            "s1": s1.detach(),
            "s2": s2.detach(),
            "sigma": sigma.detach().mean(),
            "target_std": targets.std(dim=1).mean(),
        }
        return loss, logs

    @torch.no_grad()
    def update_center(self, t_raw: torch.Tensor) -> None:
        """centre <- m * centre + (1 - m) * mean of the raw target outputs over the global batch (all ranks)."""
        batch_mean = distributed.all_reduce_mean(t_raw.mean(dim=0, keepdim=True))
        m = self.config.center_momentum
        self.center.mul_(m).add_(batch_mean, alpha=1.0 - m)
