"""Models: specs (metadata), architectures, checkpoint converters, weights resolution, the Backbone face, and the
heads and networks of the suite's own pretraining checkpoints (``heads.py``, ``networks.py``, ``checkpoints.py``),
which ``pretrain/`` trains and this package rebuilds for evaluation; nothing here imports the training code."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..devices import resolve_device
from ..errors import CardError, ProsminBenchError
from .architectures import ARCHITECTURES, build_architecture, mocov3_init_, set_sincos_position_embedding
from .backbone import Backbone
from .converters import pretrain_eval_network
from .custom import MODULE_PREFIX, ModuleBackbone, resolve_models
from .timm_models import find_weights, load_timm_weights
from .networks import build_eval_modules
from .spec import MINI_PREPROCESS, ModelSpec, Preprocess, WeightsSource
from .weights import load_weights, resolve_weights_path, sha256_state_dict
from .zoo import catalogue, get_model_spec, list_model_names

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES", "Backbone", "ModuleBackbone",
    "ModelSpec", "Preprocess", "WeightsSource", "MINI_PREPROCESS", "build_architecture",
    "catalogue", "get_model", "get_model_spec", "list_model_names",
]


def get_model(
    name: str | ModelSpec | torch.nn.Module, *, weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None, transform: Any = None,
    model_name: str | None = None, shipped: bool = True,
) -> Backbone:
    """Build a registered model with its weights, strictly loaded, in eval mode on ``device``.

    Args:
        name: a registered model name (``prosmin_micro``, ``dino_vits16``, ``timm:<name>``), a ModelSpec,
            ``module:<python.path>:<callable>``, a Backbone, or an ``nn.Module`` (images [B, 3, H, W] -> features
            [B, D]) with ``model_name`` and optionally ``transform`` (``models/custom.py``).
        weights: a checkpoint path in any supported format (overrides the model's own weights source).
        device: "cpu", "cuda", "auto", ...
        weights_dir: a folder searched first for the card's weights file.
        transform: PIL image -> tensor [3, H, W] for an nn.Module (default: the mini tasks' preprocessing).
        model_name: the name of an nn.Module's records.
        shipped: a recipe model may use the checkpoint shipped in the package when none was made here
            (``models/shipped.py``).

    Returns:
        Backbone whose ``forward(images [N, 3, H, W])`` returns features [N, D]; for checkpoints written by the
        pretraining module also ``projector(images) -> [N, K]`` and, for ProSMin, ``predictive(images) -> (mu,
        sigma)`` (``has_projector`` / ``has_predictive`` say which).
    """
    if isinstance(name, torch.nn.Module) or (isinstance(name, str) and name.startswith(MODULE_PREFIX)):
        if weights is not None or weights_dir is not None:
            raise ProsminBenchError("`weights` and `weights_dir` apply to registered models; load an nn.Module's "
                                    "weights yourself (module.load_state_dict)")
        ((_, built),) = resolve_models([name], name=model_name, transform=transform, suites=["mini"],
                                       spec_of=get_model_spec)
        return built.to(resolve_device(device))
    spec = name if isinstance(name, ModelSpec) else get_model_spec(name)
    timm_model = spec.arch.startswith("timm:")
    if timm_model and weights is None and spec.weights.kind == "file":  # timm:<name>.<tag>: its pretrained file
        weights = find_weights(spec)
    path = resolve_weights_path(spec, weights, weights_dir, shipped=shipped)
    predictive = projector = network = None
    if path is None:  # random init, fixed by the spec's seed so "random_micro" is one model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.weights.seed)
            net = build_architecture(spec.arch, **spec.arch_kwargs)
            try:
                if spec.weights.init == "mocov3":  # MoCo-v3's vits.py init, drawn after timm's from the same seed
                    mocov3_init_(net)
                if spec.weights.init in ("sincos", "mocov3"):
                    set_sincos_position_embedding(net)
            except ValueError as exc:
                raise CardError(f"Model {spec.name!r}: weights.init = {spec.weights.init!r}: {exc}") from None
        digest = sha256_state_dict(net.state_dict())
    else:
        net = build_architecture(spec.arch, **spec.arch_kwargs)
        load = load_timm_weights if timm_model else load_weights
        digest, fmt, ckpt = load(net, spec, path, verify_sha=weights is None)
        if fmt == "prosmin_bench":  # the pretraining module's checkpoints also carry the heads (issues 7, 10)
            heads = build_eval_modules(ckpt, network=spec.weights.network)
            predictive, projector = heads.predictive, heads.projector
            network = pretrain_eval_network(ckpt, spec.weights.network)
        del ckpt
    model = Backbone(spec, net, digest, predictive=predictive, projector=projector,
                     weights_path=str(path) if path else None, network=network)
    return model.to(resolve_device(device))
