"""Projection heads and ProSMin's probabilistic predictor.

- :class:`DINOHead` (DINO, Caron et al. 2021, ``vision_transformer.py``; used unchanged by iBOT and ProSMin):
  MLP (``nlayers`` linear layers, GELU, optional BN) to a bottleneck, L2-normalise, weight-normalised linear to
  ``out_dim`` outputs without bias.
- :class:`ProbabilisticPredictor` (ProSMin, PROTOCOLS.md "ProSMin"): maps the projection to a diagonal Gaussian
  ``(mu, sigma)`` with ``sigma = exp(0.5 * log-variance)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _trunc_normal_init(module: nn.Module) -> None:
    """DINO's head init: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||_row).T`` without bias (Salimans & Kingma 2016), as DINO's ``last_layer``.

    Written out instead of ``torch.nn.utils.weight_norm`` (deprecated; its parametrised replacement changes the
    state-dict keys). ``weight_g`` starts at 1; with ``norm_last_layer`` it is frozen, so every output is a
    cosine similarity (DINO ``norm_last_layer=True``).

    Shapes: x [N, in_dim] -> [N, out_dim].
    """

    def __init__(self, in_dim: int, out_dim: int, *, freeze_norm: bool) -> None:
        super().__init__()
        ref = nn.Linear(in_dim, out_dim, bias=False)  # DINO keeps nn.Linear's default init for the last layer
        self.weight_v = nn.Parameter(ref.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_norm)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """DINO projection head. Shapes: x [N, in_dim] -> [N, out_dim].

    Args:
        in_dim: backbone feature width.
        out_dim: number of outputs K (DINO 65536; ProSMin code 12000).
        hidden_dim: MLP width (DINO/ProSMin: 2048).
        bottleneck_dim: width before the L2 normalisation (DINO/ProSMin: 256).
        nlayers: linear layers in the MLP (DINO/ProSMin: 3).
        use_bn: BatchNorm after hidden linear layers (DINO default False; ProSMin paper's "with BN" ablation).
        norm_last_layer: freeze the last layer's weight norm at 1 (DINO True; ProSMin released code False).
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_trunc_normal_init)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class ProbabilisticPredictor(nn.Module):
    """ProSMin's predictor q: projection [N, K] -> (mu [N, K], sigma [N, K]).

    Paper: a two-layer MLP (hidden 12000, GELU) then two linear heads for mu and sigma. Released code
    (``utils.wrapper``): Linear K->H, GELU, Linear H->K, L2-normalise, ReLU; ``mu = Linear(no bias)``,
    ``sigma = exp(0.5 * Linear(no bias))``, i.e. the second head predicts the log-variance. ``normalize=False``
    drops the L2-normalise + ReLU (the paper's description).
    """

    def __init__(self, dim: int, hidden_dim: int, *, normalize: bool = True) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))
        self.normalize = normalize
        self.mu = nn.Linear(dim, dim, bias=False)
        self.log_var = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mlp(x)
        if self.normalize:
            h = F.relu(F.normalize(h, dim=-1, p=2))
        return self.mu(h), torch.exp(0.5 * self.log_var(h))
