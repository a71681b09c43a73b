"""Projection heads and ProSMin's probabilistic predictor: the layers that sit on a backbone in the suite's
pretraining networks (``networks.py``). They live with the models because evaluation rebuilds them from a
pretraining checkpoint (a ProSMin model's predictive sigma, any method's projector); ``pretrain/`` trains them.

- :class:`DINOHead` (DINO, Caron et al. 2021, ``vision_transformer.py``; used unchanged by iBOT and ProSMin):
  MLP (``nlayers`` linear layers, GELU, optional BN) to a bottleneck, L2-normalise, weight-normalised linear to
  ``out_dim`` outputs without bias.
- :class:`IBOTHead`: DINO's head applied to every token, with iBOT's separate patch output layer.
- :func:`build_mlp`: MoCo-v3's projector and predictor MLPs (Linear, BN, ReLU; a last BN without affine).
- :class:`ProbabilisticPredictor` (ProSMin, docs/protocols.md "ProSMin"): maps the projection to a diagonal Gaussian
  ``(mu, sigma)`` with ``sigma = exp(0.5 * log-variance)``.

A head's size comes from its method's config (``cfg``): the method's ``MethodConfig`` while training, the
``method_config`` saved in a checkpoint when rebuilding one; only the attributes named in each builder are read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


def embed_dim_of(backbone: nn.Module) -> int:
    """Feature width of a timm backbone (``num_features``; ``embed_dim`` as a fallback)."""
    for attr in ("num_features", "embed_dim"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"Cannot tell the feature width of {type(backbone).__name__}: no num_features/embed_dim")


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


def dino_head(in_dim: int, cfg: Any) -> DINOHead:
    """The DINO head a ProSMin or DINO config describes (``out_dim``, ``head_hidden_dim``, ``head_bottleneck_dim``,
    ``head_nlayers``, ``head_use_bn``, ``norm_last_layer``)."""
    return DINOHead(in_dim, cfg.out_dim, hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim,
                    nlayers=cfg.head_nlayers, use_bn=cfg.head_use_bn, norm_last_layer=cfg.norm_last_layer)


class IBOTHead(nn.Module):
    """iBOTHead: DINO's head whose MLP is applied to every token; [CLS] through ``last_layer``, patch tokens
    through ``last_layer`` too when shared, else through ``patch.last_layer`` (iBOT's ``last_layer2``; nested so
    the loop's ``.last_layer.`` freezing of the first epoch applies to it as in iBOT's ``cancel_gradients_last_layer``).

    ``cfg``: :func:`dino_head`'s attributes and ``patch_out_dim``.
    Shapes: cls_and_patches(tokens [N, T, E]) -> ([N, K], [N, T - 1, K_patch]); forward(x [N, E]) -> [N, K].
    """

    def __init__(self, in_dim: int, cfg: Any, *, shared: bool) -> None:
        super().__init__()
        base = dino_head(in_dim, cfg)
        self.mlp, self.last_layer = base.mlp, base.last_layer
        if not shared:
            self.patch = nn.Module()
            self.patch.last_layer = WeightNormLinear(cfg.head_bottleneck_dim, cfg.patch_out_dim,
                                                     freeze_norm=cfg.norm_last_layer)

    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        # tokens [N, T, E] go through the MLP as N * T rows, so a BN layer (``head_use_bn``) normalises over every
        # token of the batch, as iBOT's CustomSequential does by moving the channels to dim 1
        z = self.mlp(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return F.normalize(z, dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self._bottleneck(x))

    def cls_and_patches(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._bottleneck(tokens)
        patch_layer = self.patch.last_layer if hasattr(self, "patch") else self.last_layer
        return self.last_layer(z[:, 0]), patch_layer(z[:, 1:])


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo-v3 ``_build_mlp``: Linear(bias=False) -> BN -> ReLU per hidden layer; the last Linear(bias=False) is
    followed by a BN without affine parameters. Shapes: [N, input_dim] -> [N, output_dim]."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else mlp_dim
        d_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


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
