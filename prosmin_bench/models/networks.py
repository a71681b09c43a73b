"""The networks of the suite's pretraining methods (a backbone and its heads), and their rebuild from a checkpoint.

Each method has an online network (trained) and, except methods without one, a target network (an EMA of the
online one); their state dicts are a checkpoint's ``"online"`` and ``"target"``. :data:`NETWORKS` says which
classes they are, :func:`build_networks` builds them: ``pretrain/`` for training, :func:`build_eval_modules` for
evaluation, so the two always agree on every parameter name and shape.

Evaluation takes from a checkpoint, besides the evaluated backbone (``converters.pretrain_eval_network``):

- ``predictive``: ProSMin's online network (online backbone -> projection head -> probabilistic predictor) as a
  module mapping images [N, 3, H, W] to ``(mu [N, K], sigma [N, K])``; the OOD, linear and collapse tasks score
  its sigma (issue 10). Only the online network has a predictor, so a model evaluated through the target network
  (``weights.network = "target"``, e.g. ``prosmin_target_micro``) has no predictive module: its sigma rows would
  describe another network than its backbone rows.
- ``projector``: the evaluated network (the online network for ProSMin, as its paper's Sec. 6, and for MoCo-v3
  (base encoder) and methods without a target; the target network for DINO and iBOT; or the one a model names)
  as backbone -> projection head, images -> projection [N, K] (issue 7: collapse metrics on projector outputs),
  so the projector rows describe the same network as the backbone rows.

Both come from one build of the networks (a ProSMin ViT-S/16 holds ~0.5 B parameters, most of them in the
predictor); every state is loaded strictly; every module is in eval mode with ``requires_grad=False``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import WeightsError
from .architectures import build_architecture
from .checkpoints import check_format
from .converters import pretrain_eval_network
from .heads import IBOTHead, ProbabilisticPredictor, build_mlp, dino_head, embed_dim_of
from .weights import load_state_strict


def multicrop_features(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of a list of views [b, 3, H_v, W_v] -> [V * b, E], one pass per run of equal sizes (as
    DINO's MultiCropWrapper)."""
    out, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out.append(backbone(torch.cat(views[start:end])))
        start = end
    return torch.cat(out)


class ProSMinOnline(nn.Module):
    """ProSMin's online network. ``forward(images [N, 3, H, W]) -> (mu [N, K], sigma [N, K])``; ``forward_views``
    runs a list of multi-crop views and returns ``(mu, sigma)`` stacked over views, [V * N, K]."""

    def __init__(self, backbone: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = dino_head(embed_dim_of(backbone), cfg)
        self.predictor = ProbabilisticPredictor(cfg.out_dim, cfg.predictor_hidden_dim,
                                                normalize=cfg.predictor_normalize)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.head(self.backbone(images)))

    def forward_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.head(multicrop_features(self.backbone, views)))


class DINONetwork(nn.Module):
    """Backbone -> DINO head: DINO's student and teacher, ProSMin's target. ``forward_views(views) -> [V * b, K]``
    (one backbone pass per run of equal sizes)."""

    def __init__(self, backbone: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = dino_head(embed_dim_of(backbone), cfg)

    def forward_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.head(multicrop_features(self.backbone, views))


class IBOTStudent(nn.Module):
    """iBOT's student: backbone, iBOT head, and the mask token (iBOT's ``masked_embed``, zeros at init)."""

    def __init__(self, backbone: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        dim = embed_dim_of(backbone)
        self.head = IBOTHead(dim, cfg, shared=cfg.shared_head)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))


class IBOTTeacher(nn.Module):
    """iBOT's teacher: backbone and iBOT head (EMA of the student's parameters of the same names)."""

    def __init__(self, backbone: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = IBOTHead(embed_dim_of(backbone), cfg, shared=cfg.shared_head_teacher)


class MoCoBase(nn.Module):
    """MoCo-v3's base encoder + predictor: ``forward(images) -> q [N, dim]``."""

    def __init__(self, backbone: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = build_mlp(3, embed_dim_of(backbone), cfg.mlp_dim, cfg.dim)
        self.predictor = build_mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.head(self.backbone(images)))


class MoCoMomentum(nn.Module):
    """MoCo-v3's momentum encoder: ``forward(images) -> k [N, dim]``."""

    def __init__(self, backbone: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = build_mlp(3, embed_dim_of(backbone), cfg.mlp_dim, cfg.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


#: method -> (online network class, target network class or None); each is built as ``cls(backbone, cfg)``.
NETWORKS: dict[str, tuple[type[nn.Module], type[nn.Module] | None]] = {
    "prosmin": (ProSMinOnline, DINONetwork),
    "dino": (DINONetwork, DINONetwork),
    "ibot": (IBOTStudent, IBOTTeacher),
    "mocov3": (MoCoBase, MoCoMomentum),
}

#: Methods whose online network maps images to a predictive distribution ``(mu, sigma)``.
PREDICTIVE = frozenset({"prosmin"})


def build_networks(method: str, cfg: Any, make_backbone: Callable[[float], nn.Module]
                   ) -> tuple[nn.Module, nn.Module | None]:
    """Fresh online and target networks of ``method`` (target None for a method without one), the online backbone
    ``make_backbone(cfg.drop_path_rate)``, the target's ``make_backbone(0.0)`` (DINO, iBOT and ProSMin's released
    code: no stochastic depth in the target). Built in that order, so a seeded build is the same every time."""
    online_cls, target_cls = NETWORKS[method]
    online = online_cls(make_backbone(cfg.drop_path_rate), cfg)
    target = None if target_cls is None else target_cls(make_backbone(0.0), cfg)
    return online, target


class Projector(nn.Module):
    """``forward(images [N, 3, H, W]) -> head(backbone(images)) [N, K]``: the evaluated network's projection of the
    final-norm CLS feature, as in pretraining (before any centring or temperature the loss applies)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclasses.dataclass
class EvalModules:
    """``predictive``: images -> (mu, sigma), None for methods without a probabilistic predictor and for a model
    evaluated through the target network;
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


def _saved_networks(ckpt: Mapping[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """The networks a checkpoint's saved config describes, freshly built (drop path off: they are evaluated)."""
    method, cfg = ckpt.get("method"), ckpt.get("config")
    if method not in NETWORKS:
        raise WeightsError(f"The pretraining checkpoint is of method {method!r}, whose networks this version cannot "
                           f"build (known: {sorted(NETWORKS)}); evaluate it with the version that wrote it")
    try:
        arch, arch_kwargs = cfg["arch"], dict(cfg["arch_kwargs"])
        knobs = types.SimpleNamespace(**{**cfg["method_config"], "drop_path_rate": 0.0})

        def make_backbone(drop_path_rate: float) -> nn.Module:
            return build_architecture(arch, **{**arch_kwargs, "drop_path_rate": drop_path_rate})

        return build_networks(method, knobs, make_backbone)
    except (KeyError, TypeError, AttributeError) as exc:  # a config without what the networks are built from
        raise WeightsError(f"The pretraining checkpoint's config lacks {exc}: it is damaged or was written by "
                           "another version of prosmin-bench; pretrain it again with this version") from None


def build_eval_modules(ckpt: Mapping[str, Any], *, predictive: bool = True, projector: bool = True,
                       network: str | None = None) -> EvalModules:
    """The predictive and projector modules of a pretraining checkpoint dict, from one build of its networks;
    ``network`` ("online" / "target", None: the method's choice, ``converters.pretrain_eval_network``) is the
    evaluated network: the projector is its backbone -> head, and the predictive module exists only when it is
    the online network (the one with the predictor)."""
    check_format(ckpt)
    key = pretrain_eval_network(ckpt, network)  # "online" also for a method without a target network
    online, target = _saved_networks(ckpt)
    pred = None
    if predictive and ckpt["method"] in PREDICTIVE and key == "online":
        _load(online, ckpt["online"], "online")
        pred = _freeze(online)
    proj = None
    if projector:
        net = online if key == "online" else target
        if isinstance(getattr(net, "head", None), nn.Module) and isinstance(getattr(net, "backbone", None), nn.Module):
            if key not in ckpt or not isinstance(ckpt[key], Mapping):
                raise WeightsError(f"The pretraining checkpoint has no {key!r} state; it is damaged")
            if pred is None or key != "online":  # the online state is already in place for the predictive module
                _load(net, ckpt[key], key)
            proj = _freeze(Projector(net.backbone, net.head))
    return EvalModules(pred, proj)


def build_predictive(ckpt: Mapping[str, Any]) -> nn.Module | None:
    """``images -> (mu, sigma)`` through the ONLINE network of a pretraining checkpoint, in eval mode and frozen;
    ``None`` for methods without a probabilistic predictor. The online state is loaded strictly."""
    return build_eval_modules(ckpt, projector=False, network="online").predictive
