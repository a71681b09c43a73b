"""Checkpoint converters: one pure function per checkpoint format, mapping a loaded checkpoint to a state dict
for the timm backbone (``num_classes=0``), followed by a strict load (``models/weights.py``).

Formats (docs/protocols.md "Official baseline checkpoints"; key names checked against the official repositories):

- ``plain``: a bare backbone state dict in timm/DINO key names (``dino_deitsmall16_pretrain.pth`` as loaded by
  DINO's ``hubconf.py`` with ``strict=True``; timm weights). DINO's and iBOT's ViT use timm's parameter names
  (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
  mlp.fc2}.*``, ``norm.*``).
- ``dino_full``: DINO's full training checkpoint ``{student, teacher, optimizer, epoch, args, dino_loss[,
  fp16_scaler]}`` (``main_dino.py`` ``save_dict``). The teacher is not DDP-wrapped for ViTs, so its keys are
  ``backbone.*`` and ``head.{mlp.0,mlp.2,mlp.4,last_layer}.*``; the student's are ``module.backbone.*``,
  ``module.head.*``. The teacher's backbone is what DINO evaluates (``eval_knn.py --checkpoint_key teacher``).
- ``ibot_full``: iBOT's full checkpoint ``{student, teacher, optimizer, epoch, args, ibot_loss[, fp16_scaler]}``
  (``main_ibot.py``); ``ibot_loss`` holds ``center`` and ``center2``. The teacher's ``backbone.*`` is kept; the
  mask token ``masked_embed`` (present in the student, which is built with ``masked_im_modeling=True``) is
  dropped wherever it appears, as are the heads (``head.mlp.*``, ``head.last_layer*``).
- ``ibot_teacher``: iBOT's released ``checkpoint_teacher.pth`` ``{'state_dict': un-prefixed ViT keys [+ head.*]}``
  (``extract_backbone_weights.py --checkpoint_key teacher``, optionally ``--with_head``); ``head.*`` and
  ``masked_embed`` are dropped.
- ``mocov3``: MoCo-v3's ``{epoch, arch, state_dict, optimizer, scaler}`` with ``state_dict`` holding
  ``module.base_encoder.*``, ``module.momentum_encoder.*`` and ``module.predictor.*`` (``main_moco.py``,
  DDP-wrapped ``moco.builder.MoCo_ViT``); ``module.base_encoder.*`` is kept minus its ``head.*`` (the 3-layer
  BN projector), as in MoCo-v3's ``main_lincls.py``.
- ``prosmin_bench``: this suite's pretraining checkpoint (``models/checkpoints.py``); the ``backbone.*`` of the
  network its method is evaluated with (:func:`pretrain_eval_network`): the online network for ProSMin and MoCo-v3
  and for methods without a target, the target (EMA) network for DINO and iBOT; a model may name the other one
  (``WeightsSource.network``).

Prefixes are removed with ``startswith`` and slicing, never ``str.replace`` (which would also rewrite a
``module.`` in the middle of a key).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import WeightsError
from ..registry import Registry
from .checkpoints import FORMAT as PRETRAIN_FORMAT

StateDict = dict[str, torch.Tensor]

CONVERTERS: Registry[Callable[[Mapping[str, Any]], StateDict]] = Registry("checkpoint format")

#: Method family whose official checkpoints use each format (``None``: any family can produce it).
FORMAT_FAMILY: dict[str, str | None] = {
    "plain": None, "dino_full": "dino", "ibot_full": "ibot", "ibot_teacher": "ibot", "mocov3": "mocov3",
    "prosmin_bench": None,
}


def strip_prefix(state: Mapping[str, Any], prefix: str, *, drop: tuple[str, ...] = ()) -> StateDict:
    """Keep the keys that start with ``prefix``, with the prefix removed; then drop keys equal to, or starting
    with ``<d>.`` for, any ``d`` in ``drop``."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith(prefix):
            sub = key[len(prefix) :]
            if not any(sub == d or sub.startswith(d + ".") for d in drop):
                out[sub] = value
    return out


def _keys_preview(keys: Any, limit: int = 12) -> str:
    keys = sorted(map(str, keys))
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return "[" + ", ".join(map(repr, keys[:limit])) + more + "]"


def _require(ckpt: Mapping[str, Any], key: str, fmt: str) -> Mapping[str, Any]:
    if key not in ckpt or not isinstance(ckpt[key], Mapping):
        raise WeightsError(
            f"Expected a {fmt} checkpoint to hold a {key!r} dict, but its top-level keys are {_keys_preview(ckpt)}; "
            "pass a checkpoint in that format or let the format be detected (converter = \"auto\")"
        )
    return ckpt[key]


def _nonempty(state: StateDict, source: Mapping[str, Any], prefix: str, fmt: str) -> StateDict:
    if not state:
        raise WeightsError(
            f"Expected {fmt} backbone keys starting with {prefix!r}, but found none among {_keys_preview(source)}"
        )
    return state


@CONVERTERS.register("plain")
def convert_plain(ckpt: Mapping[str, Any]) -> StateDict:
    """A bare backbone state dict: returned as is, minus a classifier ``head.*`` (the backbone has none)."""
    return _nonempty(strip_prefix(ckpt, "", drop=("head",)), ckpt, "", "plain")


@CONVERTERS.register("dino_full")
def convert_dino_full(ckpt: Mapping[str, Any]) -> StateDict:
    """DINO full checkpoint -> teacher backbone (DINO evaluates the teacher: eval_knn.py ``checkpoint_key``)."""
    teacher = _require(ckpt, "teacher", "DINO full")
    return _nonempty(strip_prefix(teacher, "backbone."), teacher, "backbone.", "DINO full (teacher)")


@CONVERTERS.register("ibot_full")
def convert_ibot_full(ckpt: Mapping[str, Any]) -> StateDict:
    """iBOT full checkpoint -> teacher backbone without the mask token (iBOT evaluates the teacher)."""
    teacher = _require(ckpt, "teacher", "iBOT full")
    state = strip_prefix(teacher, "backbone.", drop=("masked_embed",))
    return _nonempty(state, teacher, "backbone.", "iBOT full (teacher)")


@CONVERTERS.register("ibot_teacher")
def convert_ibot_teacher(ckpt: Mapping[str, Any]) -> StateDict:
    """iBOT ``checkpoint_teacher.pth`` -> backbone: drop the projection head and the mask token."""
    inner = _require(ckpt, "state_dict", "iBOT teacher")
    return _nonempty(strip_prefix(inner, "", drop=("head", "masked_embed")), inner, "", "iBOT teacher")


@CONVERTERS.register("mocov3")
def convert_mocov3(ckpt: Mapping[str, Any]) -> StateDict:
    """MoCo-v3 -> ``module.base_encoder.*`` minus its projector ``head.*`` (moco-v3 main_lincls.py)."""
    inner = _require(ckpt, "state_dict", "MoCo-v3")
    prefix = "module.base_encoder."
    return _nonempty(strip_prefix(inner, prefix, drop=("head",)), inner, prefix, "MoCo-v3")


#: Methods whose pretraining checkpoints are evaluated with the online network rather than the target (EMA) one:
#: - ProSMin: the paper (Vahidi et al., ICLR 2024), Sec. 6: "we freeze the encoder of the online network fθ"
#:   (docs/protocols.md "Protocol facts checked against the reference code": the released eval_linear.py loads the
#:   ``target`` key, but its trainer shares one backbone between the two networks, so the paper's text decides);
#: - MoCo-v3: main_lincls.py keeps ``module.base_encoder`` (the online encoder), as :func:`convert_mocov3` does for
#:   the official checkpoints.
#: DINO and iBOT evaluate their teacher (eval_knn.py / eval_linear.py ``--checkpoint_key teacher``): the default.
ONLINE_EVALUATED = frozenset({"prosmin", "mocov3"})

#: The networks a pretraining checkpoint can be evaluated with (``WeightsSource.network``, card ``weights.network``).
NETWORK_CHOICES = ("online", "target")


def pretrain_eval_network(ckpt: Mapping[str, Any], network: str | None = None) -> str:
    """``"target"`` or ``"online"``: which network of this suite's pretraining checkpoint is evaluated.

    ``network`` (a model's ``weights.network``) names one explicitly; ``None`` takes the method's own choice
    (:data:`ONLINE_EVALUATED`; a method without a target network saves ``target = {}`` and is evaluated online).
    Naming a network the checkpoint does not hold raises WeightsError.
    """
    target = ckpt.get("target")
    has_target = isinstance(target, Mapping) and _has_prefix(target, "backbone.")
    if network is not None:
        if network not in NETWORK_CHOICES:
            raise WeightsError(f"Expected network 'online' or 'target', but got {network!r}")
        if network == "target" and not has_target:
            raise WeightsError(
                f"The model asks for the target network, but this {ckpt.get('method')!r} pretraining checkpoint has "
                "none (its method has no target network); evaluate it with weights.network = \"online\""
            )
        return network
    if ckpt.get("method") in ONLINE_EVALUATED or not has_target:
        return "online"
    return "target"


@CONVERTERS.register("prosmin_bench")
def convert_prosmin_bench(ckpt: Mapping[str, Any], network: str | None = None) -> StateDict:
    """This suite's pretraining checkpoint -> the backbone of the network it is evaluated with
    (:func:`pretrain_eval_network`): ``network`` when given, else its method's choice (the online network for
    ProSMin, as its paper, and MoCo-v3, its base encoder; the target for DINO and iBOT, as they evaluate their
    teacher)."""
    net = _require(ckpt, pretrain_eval_network(ckpt, network), "prosmin-bench pretraining")
    return _nonempty(strip_prefix(net, "backbone."), net, "backbone.", "prosmin-bench pretraining")


_BACKBONE_MARKERS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "conv1.weight", "stem.0.weight")


def _looks_like_backbone(state: Mapping[str, Any]) -> bool:
    return any(k in state for k in _BACKBONE_MARKERS)


def _has_prefix(state: Mapping[str, Any], prefix: str) -> bool:
    return any(isinstance(k, str) and k.startswith(prefix) for k in state)


def detect_format(ckpt: Any) -> str:
    """Name the format of a loaded checkpoint from its keys; unknown formats raise with the keys found.

    >>> detect_format({"teacher": {"backbone.cls_token": torch.zeros(1)}, "dino_loss": {}})
    'dino_full'
    """
    if not isinstance(ckpt, Mapping):
        raise WeightsError(
            f"Expected a checkpoint holding a dict of tensors, but the file holds a {type(ckpt).__name__}; "
            "pass a state dict or one of the official checkpoint files"
        )
    if ckpt.get("format") == PRETRAIN_FORMAT:
        return "prosmin_bench"
    teacher = ckpt.get("teacher")
    if isinstance(teacher, Mapping) and _has_prefix(teacher, "backbone."):
        student = ckpt.get("student")
        student = student if isinstance(student, Mapping) else {}
        if (
            "ibot_loss" in ckpt
            or _has_prefix(teacher, "head.last_layer2")
            or any(k.endswith("backbone.masked_embed") for k in [*teacher, *student] if isinstance(k, str))
        ):
            return "ibot_full"
        return "dino_full"
    inner = ckpt.get("state_dict")
    if isinstance(inner, Mapping):
        if _has_prefix(inner, "module.base_encoder."):
            return "mocov3"
        if _looks_like_backbone(inner):
            return "ibot_teacher"
    if _looks_like_backbone(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "plain"
    nested = "".join(
        f"; {key!r} holds {_keys_preview(ckpt[key], 6)}" for key in ("state_dict", "model", "teacher")
        if isinstance(ckpt.get(key), Mapping)
    )
    raise WeightsError(
        f"Unknown checkpoint format: top-level keys {_keys_preview(ckpt)}{nested}; known formats: "
        f"{', '.join(CONVERTERS.names())}. Pass a checkpoint in one of these formats, or save the backbone as a "
        "plain state dict (timm key names)"
    )


def convert(ckpt: Any, fmt: str = "auto", network: str | None = None) -> tuple[StateDict, str]:
    """Convert a loaded checkpoint to a backbone state dict; returns ``(state_dict, format_name)``.

    ``fmt="auto"`` detects the format from the keys; a named format must be registered in ``CONVERTERS``.
    ``network`` ("online" / "target") picks the network of this suite's pretraining checkpoints (format
    ``prosmin_bench``); any other format with a ``network`` is an error (its converter has one fixed network).
    """
    if fmt == "auto":
        name = detect_format(ckpt)
    else:
        if not isinstance(ckpt, Mapping):
            detect_format(ckpt)  # raises the "not a dict" error
        name = fmt
    if network is not None:
        if name != "prosmin_bench":
            raise WeightsError(
                f"The model names network {network!r}, which applies only to this suite's pretraining checkpoints "
                f"(format prosmin_bench), but the checkpoint is of format {name}; drop weights.network or pass a "
                "checkpoint written by `prosmin-bench pretrain`"
            )
        return convert_prosmin_bench(ckpt, network), name
    return CONVERTERS.get(name)(ckpt), name


def checkpoint_family(ckpt: Mapping[str, Any], fmt: str) -> str | None:
    """The method family that produced a checkpoint when its format says so unambiguously, else ``None``.

    Official full checkpoints name their loss (``dino_loss``/``ibot_loss``), MoCo-v3's its momentum encoder, and
    this suite's checkpoints record ``method``; a plain state dict could come from anywhere.
    """
    if fmt == "prosmin_bench":
        method = ckpt.get("method")
        return method if isinstance(method, str) and method else None
    if fmt == "dino_full":
        return "dino" if "dino_loss" in ckpt else None
    if fmt in ("ibot_full", "mocov3"):
        return FORMAT_FAMILY[fmt]
    return None
