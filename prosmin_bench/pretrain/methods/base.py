"""The interface between a pretraining method and the shared training loop (``pretrain/train.py``).

A method is an ``nn.Module`` registered in ``METHODS`` (``methods/__init__.py``) under its name, with a typed
config dataclass ``config_class`` (a subclass of :class:`MethodConfig`). The loop:

1. builds it: ``method = cls(cfg.method_config, backbone_factory=factory, crops=cfg.crops)`` where
   ``factory(drop_path_rate)`` returns a fresh backbone (the subclass calls ``super().__init__(config,
   crops=crops)``, builds ``self.online`` / ``self.target``, then ``self.configure_backbone()`` and
   ``self.init_target_from_online()``);
2. per step, under autocast, calls ``loss, logs = model(batch, progress)`` where ``model`` is the method itself
   or its DDP wrapper (DDP wraps the whole method; only parameters with ``requires_grad`` are synchronised, so
   the target, which has none, is never all-reduced);
3. backward, ``method.before_optimizer_step(progress)`` (e.g. cancel last-layer gradients), gradient clipping,
   optimiser step;
4. ``method.update_target(momentum)`` with the momentum of the cosine schedule
   ``config.momentum_start -> config.momentum_end`` (skipped for methods without a target);
5. checkpoints ``method.online.state_dict()``, ``method.target.state_dict()`` and ``method.extra_state()``.

Contract for subclasses:

- ``self.online``: the trained network, an ``nn.Module`` whose children are named ``backbone`` (the ViT), then
  e.g. ``head`` and ``predictor``; its state dict is the checkpoint's ``"online"``.
- ``self.target``: the EMA network (``backbone``, ``head``) with ``requires_grad=False`` everywhere, or ``None``
  for methods without one; its state dict is the checkpoint's ``"target"`` and its ``backbone`` is what the
  model registry evaluates (``target_backbone()``). Methods without a target evaluate ``online.backbone``.
- ``forward(batch, progress) -> (loss, logs)``: ``loss`` a scalar float32 tensor, averaged over the local batch
  (so DDP's gradient averaging equals the gradient of the global-batch loss); ``logs`` a flat dict of floats
  or 0-d tensors (the loop converts them and writes them to the JSONL log: use short names such as ``s1``).
  Cross-process statistics (centres, batch means) go through ``prosmin_bench.distributed`` only.
- ``extra_state()`` / ``load_extra_state(state)``: everything besides parameters that a resume needs
  (centres, queues...), as a dict of tensors. Buffers registered on the method are included automatically.
- ``param_groups()``: AdamW groups; the default follows DINO's ``get_params_groups`` (no weight decay for
  biases and 1-D parameters). The loop sets each group's ``lr`` and, where ``apply_wd`` is true, ``weight_decay``.
- ``before_optimizer_step(progress)``: hook between backward and the optimiser step (gradient surgery such as
  DINO's freezing of the last layer during the first epochs).
- the networks themselves are defined with the models (``models/networks.py`` ``NETWORKS``, built with
  ``build_networks``), which rebuild them from a checkpoint for evaluation (e.g. ProSMin's predictive sigma).

Randomness that belongs to an image (noise samples, masks) should be drawn from ``batch.rng`` (per-image
generators; see ``pretrain/rng.py``), so results do not depend on how the global batch is split over
processes or on resumption.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ...models.architectures import (POS_INTERPOLATIONS, build_architecture, mocov3_init_,
                                      set_sincos_position_embedding, use_dino_pos_interpolation)
from ...registry import Registry
from ..config import ConfigError, MultiCropConfig
from ..rng import SampleRNG

log = logging.getLogger(__name__)

#: Method classes by name; a method module registers its class with ``@METHODS.register("name")``.
METHODS: Registry[type["PretrainMethod"]] = Registry("pretraining method")

#: ``backbone_factory(drop_path_rate) -> nn.Module``: a fresh backbone of the recipe's architecture; forward
#: maps images [N, 3, H, W] to features [N, embed_dim] and ``module.num_features`` is embed_dim (timm's ViT).
BackboneFactory = Callable[[float], nn.Module]


@dataclass(frozen=True)
class MethodConfig:
    """Knobs shared by every method; subclasses add their own (each default with its source).

    ``momentum_start``/``momentum_end``: EMA momentum of the target, cosine schedule from start to end over the
    whole run (DINO ``cosine_scheduler``); ignored by methods without a target.
    ``drop_path_rate``: stochastic depth of the online backbone (paper / DINO: 0.1); the target has none.
    """

    momentum_start: float = 0.996
    momentum_end: float = 1.0
    drop_path_rate: float = 0.1
    # MoCo-v3's two ViT stabilisers (Chen et al., ICCV 2021, Sec. 4.2 and 5; vits.py), off unless a recipe turns
    # them on: a frozen random patch projection (``--stop-grad-conv1``, which the paper reports stabilises BYOL
    # and SimCLR too) and a fixed 2-D sin-cos position embedding instead of a learned one.
    stop_grad_conv1: bool = False
    sincos_pos_embed: bool = False
    # MoCo-v3's ViT initialisation (vits.py lines 31-47; models.architectures.mocov3_init_): xavier-uniform linears
    # with qkv as three blocks, zero biases, patch projection uniform(+-sqrt(6 / (3 p p + D))) with zero bias. With
    # stop_grad_conv1 this is the projection MoCo-v3 froze (PyTorch's default conv init: half its spread for
    # ViT-S/16, std 0.021 vs 0.042, and a non-zero bias); every recipe that sets stop_grad_conv1 sets it too.
    mocov3_init: bool = False
    # How a backbone built with dynamic_img_size resamples its position embedding for other crop sizes (local
    # crops): "timm" (timm's resample_abs_pos_embed: bicubic to the target grid, antialiased) or "dino" (DINO's
    # interpolate_pos_encoding, vision_transformer.py lines 174-194: bicubic, scale factor (n + 0.1) / sqrt(N), no
    # antialias; models.architectures.dino_interpolate_pos_encoding). A fixed sin-cos table (sincos_pos_embed) is
    # resampled by the same rule, not recomputed for the smaller grid: a local crop is treated as DINO treats it,
    # the scene at a lower resolution (MoCo-v3 itself feeds one size only).
    pos_interp: str = "timm"


@dataclass(frozen=True)
class Progress:
    """Where the run is: ``step`` (0-based global optimiser step), ``total_steps``, ``steps_per_epoch``."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def epoch_float(self) -> float:
        """Fractional epoch, for schedules defined in epochs (teacher temperature warm-up, last-layer freeze)."""
        return self.step / self.steps_per_epoch

    @property
    def fraction(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(self.total_steps, 1)


@dataclass
class MultiCropBatch:
    """One process's share of a step: views of the same ``b`` images.

    ``global_views``: ``crops.global_crops`` tensors [b, 3, Hg, Wg] (the views the target sees);
    ``local_views``: ``crops.local_crops`` tensors [b, 3, Hl, Wl] (may be empty);
    ``indices``: dataset indices [b]; ``rng``: per-image random draws for this step's epoch.
    """

    global_views: list[torch.Tensor]
    local_views: list[torch.Tensor]
    indices: torch.Tensor
    rng: SampleRNG

    @property
    def views(self) -> list[torch.Tensor]:
        return [*self.global_views, *self.local_views]

    @property
    def batch_size(self) -> int:
        return int(self.global_views[0].shape[0])


class PretrainMethod(nn.Module):
    """Base class of pretraining methods (see the module docstring for the contract)."""

    #: registry name, also written to the checkpoint's ``"method"``.
    name: ClassVar[str] = ""
    #: the typed config of this method.
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: whether the method needs local crops / at least this many global crops (checked against the recipe).
    min_global_crops: ClassVar[int] = 2
    uses_local_crops: ClassVar[bool] = True
    #: DDP ``find_unused_parameters`` (True only if some online parameters can miss the graph in a step).
    has_unused_parameters: ClassVar[bool] = False

    online: nn.Module
    target: nn.Module | None

    def __init__(self, config: MethodConfig, *, crops: MultiCropConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"Expected a {self.config_class.__name__} for method {self.name!r}, but got {type(config).__name__}"
            )
        if crops.global_crops < self.min_global_crops:
            raise ConfigError(
                f"Method {self.name!r} needs at least {self.min_global_crops} global crops, but the recipe sets "
                f"crops.global_crops={crops.global_crops}"
            )
        if crops.local_crops and not self.uses_local_crops:
            raise ConfigError(
                f"Method {self.name!r} uses no local crops, but the recipe sets crops.local_crops="
                f"{crops.local_crops}; set crops.local_crops=0"
            )
        self.config = config
        self.crops = crops
        self._ema_pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, batch: MultiCropBatch, progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- target
    def target_backbone(self) -> nn.Module:
        """The backbone that is evaluated: the EMA target's when there is one (as DINO evaluates its teacher)."""
        return (self.target if self.target is not None else self.online).backbone

    def configure_backbone(self) -> None:
        """Apply the config's ViT options (``mocov3_init``, then ``sincos_pos_embed`` and ``stop_grad_conv1``) to the
        online backbone and ``pos_interp`` to both backbones; call before :meth:`init_target_from_online`, which
        copies the online weights into the target."""
        c, bb = self.config, self.online.backbone
        if c.pos_interp not in POS_INTERPOLATIONS:
            raise ConfigError(f"Expected method.pos_interp to be one of {list(POS_INTERPOLATIONS)}, but got "
                              f"{c.pos_interp!r}")
        if c.pos_interp == "dino":
            for net in (self.online, self.target):
                if net is not None:
                    try:
                        use_dino_pos_interpolation(net.backbone)
                    except ValueError as exc:
                        raise ConfigError(f"method.pos_interp = 'dino': {exc}") from None
        if c.mocov3_init:
            try:
                mocov3_init_(bb)
            except ValueError as exc:
                raise ConfigError(f"method.mocov3_init: {exc}") from None
        elif c.stop_grad_conv1:
            log.warning("method.stop_grad_conv1 freezes the patch projection with timm's default init; MoCo-v3 "
                        "froze its own (uniform, zero bias): set method.mocov3_init=true for that")
        if c.sincos_pos_embed:
            try:
                set_sincos_position_embedding(bb)
            except ValueError as exc:
                raise ConfigError(f"method.sincos_pos_embed: {exc}") from None
        if c.stop_grad_conv1:
            proj = getattr(getattr(bb, "patch_embed", None), "proj", None)
            if proj is None:
                raise ConfigError("method.stop_grad_conv1 needs a ViT with a patch_embed.proj layer")
            for p in proj.parameters():
                p.requires_grad_(False)

    def init_target_from_online(self) -> None:
        """Copy the online weights into the target (same names) and freeze the target."""
        if self.target is None:
            return
        online = dict(self.online.named_parameters())
        for name, p in self.target.named_parameters():
            if name not in online:
                raise RuntimeError(f"target parameter {name!r} has no online counterpart")
            with torch.no_grad():
                p.copy_(online[name].detach())
            p.requires_grad_(False)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: xi <- m * xi + (1 - m) * theta over the target's parameters (matched to the online by name)."""
        if self.target is None:
            return
        if self._ema_pairs is None:
            online = dict(self.online.named_parameters())
            self._ema_pairs = [(p, online[n]) for n, p in self.target.named_parameters()]
        tgt = [t for t, _ in self._ema_pairs]
        src = [s.detach() for _, s in self._ema_pairs]
        torch._foreach_lerp_(tgt, src, 1.0 - float(momentum))

    def momentum_at(self, progress: Progress) -> float:
        """Cosine momentum schedule from ``momentum_start`` (step 0) to ``momentum_end`` (last step)."""
        c = self.config
        return c.momentum_end + 0.5 * (c.momentum_start - c.momentum_end) * (
            1.0 + math.cos(math.pi * progress.step / max(progress.total_steps, 1))
        )

    # ------------------------------------------------------------------------------------------- optimiser
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for n, p in self.online.named_parameters():
            if p.requires_grad:
                yield n, p

    def param_groups(self) -> list[dict[str, Any]]:
        """DINO ``get_params_groups``: no weight decay on biases and 1-D parameters (norms); ``apply_wd`` marks
        the group whose weight decay follows the schedule."""
        decay, no_decay = [], []
        for n, p in self.trainable_named_parameters():
            (no_decay if n.endswith(".bias") or p.ndim == 1 else decay).append(p)
        groups = [{"params": decay, "apply_wd": True}]
        if no_decay:
            groups.append({"params": no_decay, "apply_wd": False, "weight_decay": 0.0})
        return groups

    def before_optimizer_step(self, progress: Progress) -> None:
        """Hook between backward and the optimiser step; default does nothing."""

    # ---------------------------------------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter state a resume needs; default: the method's own buffers (not those inside networks)."""
        return {n: b.detach().clone() for n, b in self.named_buffers(recurse=False)}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_buffers(recurse=False))
        if set(own) != set(state):
            raise RuntimeError(f"extra state keys {sorted(state)} do not match the method's {sorted(own)}")
        with torch.no_grad():
            for n, b in own.items():
                b.copy_(state[n])


def build_backbone_factory(arch: str, arch_kwargs: dict[str, Any]) -> BackboneFactory:
    """``factory(drop_path_rate)`` building ``arch`` with ``arch_kwargs`` (its own drop_path_rate replaced)."""

    def factory(drop_path_rate: float) -> nn.Module:
        kwargs = dict(arch_kwargs)
        kwargs["drop_path_rate"] = drop_path_rate
        return build_architecture(arch, **kwargs)

    return factory
