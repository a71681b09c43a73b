"""Backbone: the one face every model shows to tasks (timm's forward_features/forward_head idea).

``forward(images [N, 3, H, W]) -> features [N, D]`` in the spec's feature layer; ``features(images, layer)`` for
another layer; ``embed_dim``; ``transform`` (eval preprocessing for PIL images); ``spec``; ``weights_sha256``.
Checkpoints written by the pretraining module add ``projector(images) -> [N, K]`` and, for a probabilistic method
(ProSMin), ``predictive(images) -> (mu [N, K], sigma [N, K])``; ``has_projector`` / ``has_predictive`` say
whether a model has them. ``with_preprocess(preprocess)`` is the same backbone seen through other eval
preprocessing; ``trainable_copy()`` a copy of its network to fine-tune. Tasks never look inside a model.

A network with ``same_features_every_layer = True`` (the pixel references, ``architectures.PixelFeatures``) has no
blocks: its one output is served for every layer name ("cls", "avgpool", "cls_lastN"), with that width.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
import torch.nn as nn

from ..errors import ProsminBenchError
from .spec import ModelSpec, Preprocess

_LASTN = re.compile(r"^cls_last(\d+)$")


def parse_layer(layer: str) -> tuple[str, int]:
    """``"cls"`` -> ("cls", 1); ``"cls_last4"`` -> ("cls", 4); ``"avgpool"`` -> ("avgpool", 1)."""
    if layer in ("cls", "avgpool"):
        return layer, 1
    m = _LASTN.match(layer)
    if m and int(m.group(1)) >= 1:
        return "cls", int(m.group(1))
    raise ProsminBenchError(
        f"Expected feature layer 'cls', 'avgpool' or 'cls_lastN' (N >= 1, e.g. 'cls_last4'), but got {layer!r}"
    )


class Backbone(nn.Module):
    """A frozen backbone in eval mode.

    Args:
        spec: the model's ModelSpec.
        net: the architecture (a timm ``VisionTransformer`` or any timm model with ``forward_features``).
        weights_sha256: sha256 of the loaded file, or of the state dict for in-memory weights.
        predictive: optional module mapping images [N, 3, H, W] to ``(mu [N, K], sigma [N, K])``: ProSMin's
            online network (online backbone -> projection head -> probabilistic predictor), kept in the
            checkpoint by the pretraining module; only when ``network`` is the online one.
        projector: optional module mapping images [N, 3, H, W] to the projection [N, K]: the evaluated network
            (its backbone -> its projection head) of a checkpoint written by the pretraining module.
        network: for a checkpoint of the pretraining module, which of its networks ``net`` is ("online" for
            ProSMin and MoCo-v3, "target" for DINO and iBOT, or the model's ``weights.network``;
            ``models.converters.pretrain_eval_network``); None for other weights.
    """

    def __init__(
        self, spec: ModelSpec, net: nn.Module, weights_sha256: str, predictive: nn.Module | None = None,
        weights_path: str | None = None, projector: nn.Module | None = None, network: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.net = net
        self.weights_sha256 = weights_sha256
        self.network = network
        self.weights_path = weights_path
        self.predictive_head = predictive
        self.projector_head = projector
        self.transform = spec.preprocess.build()
        self.is_vit = all(hasattr(net, a) for a in ("blocks", "norm", "patch_embed", "cls_token"))
        self.layerless = bool(getattr(net, "same_features_every_layer", False))
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        """Width of the default feature layer."""
        return self.layer_dim(self.spec.feature_layer)

    def layer_dim(self, layer: str) -> int:
        kind, n = parse_layer(layer)
        return int(getattr(self.net, "num_features", getattr(self.net, "embed_dim", 0))) * (1 if self.layerless else n)

    @property
    def record_info(self) -> dict[str, str]:
        """What a record adds to ``model_info``: a timm model's eval preprocessing (from timm's data config)."""
        return {"preprocess": self.spec.preprocess.key()} if self.spec.arch.startswith("timm:") else {}

    @property
    def has_predictive(self) -> bool:
        """Whether ``predictive`` works: a ProSMin checkpoint written by the pretraining module."""
        return self.predictive_head is not None

    @property
    def has_projector(self) -> bool:
        """Whether ``projector`` works: a checkpoint written by the pretraining module."""
        return self.projector_head is not None

    def with_preprocess(self, preprocess: Preprocess) -> "Backbone":
        """This backbone (its modules shared, not copied) seen through another eval ``preprocess``. Its spec
        carries that preprocessing, which feature cache keys include, so its features never mix with this one's."""
        return Backbone(dataclasses.replace(self.spec, preprocess=preprocess), self.net, self.weights_sha256,
                        predictive=self.predictive_head, weights_path=self.weights_path,
                        projector=self.projector_head, network=self.network)

    def trainable_copy(self) -> "Backbone":
        """A deep copy of the network alone (no predictive or projection head), every parameter trainable, in train
        mode, with this backbone's face (``features``, ``layer_dim``, ``transform``); this backbone is untouched."""
        twin = Backbone(self.spec, copy.deepcopy(self.net), self.weights_sha256, weights_path=self.weights_path,
                        network=self.network)
        twin.requires_grad_(True)
        return twin.train()

    def projector_first_layer(self) -> nn.Module | None:
        """A trainable deep copy of the projection head's first layer, or None without a head (official checkpoints).

        The first layer is the head MLP's first Linear and what follows it up to and including its activation (the
        first module without parameters): Linear + GELU for the DINO / iBOT / ProSMin heads (``heads.DINOHead``),
        Linear + BN + ReLU for MoCo-v3's projector (``heads.build_mlp``); a 1-layer head gives its Linear. iBOT's
        semi-supervised fine-tuning (``--finetune_head_layer 1``) keeps Linear + GELU of the teacher's head
        (evaluation/semi_supervised/eval_cls.py:207-256, built without a norm at 707-712); a BatchNorm in between
        (MoCo-v3, or a head with ``use_bn``) is kept here because the Linear was trained to feed it.
        Shapes: [N, D] (final-norm CLS) -> [N, hidden]."""
        head = getattr(self.projector_head, "head", None)
        mlp = getattr(head, "mlp", head)
        if not isinstance(mlp, nn.Sequential) or len(mlp) == 0 or not isinstance(mlp[0], nn.Linear):
            return None
        layers: list[nn.Module] = []
        for module in mlp:
            layers.append(module)
            if not any(True for _ in module.parameters()):  # the activation ends the layer
                break
            if len(layers) > 1 and isinstance(module, nn.Linear):  # a 1-layer head: the Linear alone
                layers.pop()
                break
        first = copy.deepcopy(nn.Sequential(*layers))
        first.requires_grad_(True)
        return first.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> features [N, D] in the spec's feature layer."""
        return self.features(images, self.spec.feature_layer)

    def features(self, images: torch.Tensor, layer: str = "cls") -> torch.Tensor:
        """images [N, 3, H, W] -> features [N, D * n] for ``cls``, ``avgpool`` or ``cls_lastN``."""
        kind, n = parse_layer(layer)
        if self.layerless:  # a reference without blocks: the same features for every layer (module docstring)
            return self.net(images)
        if not self.is_vit:
            if layer != "cls":
                raise ProsminBenchError(f"Feature layer {layer!r} needs a ViT; {self.spec.name!r} supports 'cls' only")
            return self.net(images)
        if n == 1:
            tokens = self.net.forward_features(images)  # [N, T, D], final norm applied
            if kind == "cls":
                return tokens[:, 0]
            return tokens[:, getattr(self.net, "num_prefix_tokens", 1) :].mean(dim=1)
        return torch.cat(self._last_blocks_cls(images, n), dim=-1)

    def _last_blocks_cls(self, images: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Final-norm CLS token of each of the last ``n`` blocks, [N, D] each: DINO eval_linear.py's
        ``n_last_blocks`` features (facebookresearch/dino eval_linear.py lines 166-167: ``x[:, 0]`` of each output
        of ``get_intermediate_layers(inp, n)``, which passes each of the last n blocks' outputs through the final
        ``self.norm``, vision_transformer.py lines 225-233).

        timm's public ``forward_intermediates`` runs the same stem as ``forward_features`` (patch_embed,
        ``_pos_embed``, so a subclass's position rule such as ``architectures.DinoPosEmbedViT`` applies, patch_drop,
        norm_pre), then the blocks; ``norm=True`` applies the final norm to each taken output."""
        net = self.net
        depth = len(net.blocks)
        if n > depth:
            raise ProsminBenchError(f"Expected n_last_blocks <= depth {depth}, but got {n}")
        if not hasattr(net, "forward_intermediates") or getattr(net, "cls_token", None) is None:
            raise ProsminBenchError(
                f"Feature layer 'cls_last{n}' needs a ViT with a [CLS] token and timm's forward_intermediates, which "
                f"{type(net).__name__} of {self.spec.name!r} lacks; use layer 'cls' or 'avgpool'"
            )
        taken = net.forward_intermediates(images, indices=n, norm=True, output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
        return [prefix[:, 0] for _, prefix in taken]  # each (patch tokens [N, P, D], prefix tokens [N, 1+R, D])

    def predictive(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, 3, H, W] -> (mu [N, K], sigma [N, K]) of the online predictive distribution."""
        if self.predictive_head is None:
            raise ProsminBenchError(
                f"Model {self.spec.name!r} has no predictive head: only checkpoints written by the pretraining "
                "module for a probabilistic method (ProSMin) carry one"
            )
        return self.predictive_head(images)

    def projector(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> projection [N, K]: the evaluated network's backbone -> its projection head."""
        if self.projector_head is None:
            raise ProsminBenchError(
                f"Model {self.spec.name!r} has no projection head: only checkpoints written by the pretraining "
                "module (`prosmin-bench pretrain`) keep one"
            )
        return self.projector_head(images)
