"""What other parts of the suite take from a pretraining checkpoint besides the target backbone.

- :func:`build_predictive` rebuilds ProSMin's online network (online backbone -> projection head -> probabilistic
  predictor) as a module mapping images [N, 3, H, W] to ``(mu [N, K], sigma [N, K])``; the OOD, linear and
  collapse tasks score its sigma (issue 10).
- :func:`build_projector` rebuilds the evaluated network (``models.converters.pretrain_eval_network``: the
  target network for ProSMin, DINO and iBOT, the base (online) encoder for MoCo-v3 and methods without a target)
  as backbone -> projection head, a module mapping images [N, 3, H, W] to the projection [N, K] (issue 7:
  collapse metrics on projector outputs), so the projector rows describe the same network as the backbone rows.
- :func:`build_eval_modules` gives both from one build of the method (the model registry uses it: a ProSMin
  ViT-S/16 method holds ~0.5 B parameters, most of them in the predictor, so it is built once, not twice).

Every state is loaded strictly; every module is in eval mode with ``requires_grad=False``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import WeightsError
from ..models.converters import pretrain_eval_network
from ..models.weights import load_state_strict
from . import checkpoint as ckpt_io
from .config import PretrainConfig


class TargetProjector(nn.Module):
    """``forward(images [N, 3, H, W]) -> head(backbone(images)) [N, K]``: the network's projection of the
    final-norm CLS feature, as in pretraining (before any centring or temperature the loss applies)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclasses.dataclass
class EvalModules:
    """``predictive``: images -> (mu, sigma), None for methods without a probabilistic predictor;
    ``projector``: images -> projection [N, K], None for a network without a ``head``."""

    predictive: nn.Module | None
    projector: nn.Module | None


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _load(net: nn.Module, state: Any, which: str) -> None:
    load_state_strict(net, dict(state), source=f"{which} network", advice=(
        "The checkpoint's own config builds a different network: it was probably written by another version of "
        "prosmin-bench; pretrain it again with this version"))


def build_eval_modules(ckpt: Mapping[str, Any], *, predictive: bool = True, projector: bool = True) -> EvalModules:
    """The predictive and projector modules of a pretraining checkpoint dict, from one build of its method."""
    from .train import build_method

    ckpt_io.check_format(ckpt)
    cfg = PretrainConfig.from_dict(ckpt["config"])
    # drop path off: these are evaluation modules (the parameters are the same either way)
    cfg = dataclasses.replace(cfg, method_config=dataclasses.replace(cfg.method_config, drop_path_rate=0.0))
    method = build_method(cfg)
    pred = method.predictive_module() if predictive else None
    if pred is not None:
        _load(method.online, ckpt["online"], "online")
        pred = _freeze(pred)
    proj = None
    if projector:
        key = pretrain_eval_network(ckpt)  # "online" also for a method without a target network
        net = method.online if key == "online" else method.target
        if isinstance(getattr(net, "head", None), nn.Module) and isinstance(getattr(net, "backbone", None), nn.Module):
            if key not in ckpt or not isinstance(ckpt[key], Mapping):
                raise WeightsError(f"The pretraining checkpoint has no {key!r} state; it is damaged")
            if pred is None or key != "online":  # the online state is already in place for the predictive module
                _load(net, ckpt[key], key)
            proj = _freeze(TargetProjector(net.backbone, net.head))
    return EvalModules(pred, proj)


def build_predictive(ckpt: Mapping[str, Any]) -> nn.Module | None:
    """``images -> (mu, sigma)`` through the ONLINE network of a pretraining checkpoint, in eval mode and frozen;
    ``None`` for methods without a probabilistic predictor. The online state is loaded strictly."""
    return build_eval_modules(ckpt, projector=False).predictive


def build_projector(ckpt: Mapping[str, Any]) -> nn.Module | None:
    """``images [N, 3, H, W] -> projection [N, K]`` through the evaluated network (backbone -> projection head) of
    a pretraining checkpoint: the target network, or the online one for MoCo-v3 and methods without a target; in
    eval mode and frozen, the state loaded strictly. ``None`` when the network has no projection head."""
    return build_eval_modules(ckpt, predictive=False).projector


__all__ = ["EvalModules", "TargetProjector", "build_eval_modules", "build_predictive", "build_projector"]
