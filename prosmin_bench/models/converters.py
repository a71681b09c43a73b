"""Checkpoint converters: one pure function per checkpoint format, mapping a loaded checkpoint to a state dict
for the timm backbone (``num_classes=0``), followed by a strict load (``models/weights.py``).

Formats (PROTOCOLS.md "Official baseline checkpoints"):

- ``plain``: a bare backbone state dict in timm/DINO key names (``dino_deitsmall16_pretrain.pth``, timm weights).
- ``dino_full``: DINO's full training checkpoint ``{student, teacher, optimizer, epoch, args, dino_loss}``; the
  teacher's ``backbone.*`` is the evaluated backbone.
- ``ibot_full``: iBOT's full training checkpoint ``{student, teacher, ..., ibot_loss}``; teacher ``backbone.*``
  without ``masked_embed``.
- ``ibot_teacher``: iBOT's released ``checkpoint_teacher.pth`` ``{'state_dict': un-prefixed ViT keys + head.*}``;
  drop ``head.*`` and ``masked_embed``.
- ``mocov3``: MoCo-v3's ``{'state_dict': module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}``;
  keep ``module.base_encoder.*`` minus its ``head.*`` (the projector).
- ``prosmin_bench``: this suite's pretraining checkpoint; the target network's ``backbone.*``.

Prefixes are removed with ``startswith`` and slicing, never ``str.replace`` (which would also rewrite a
``module.`` in the middle of a key).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import WeightsError
from ..registry import Registry

StateDict = dict[str, torch.Tensor]

CONVERTERS: Registry[Callable[[Mapping[str, Any]], StateDict]] = Registry("checkpoint format")

#: Marker written by the pretraining module into every checkpoint it saves.
PRETRAIN_FORMAT = "prosmin-bench/pretrain"


def strip_prefix(state: Mapping[str, Any], prefix: str, *, drop: tuple[str, ...] = ()) -> StateDict:
    """Keep the keys that start with ``prefix``, with the prefix removed; then drop keys starting with ``drop``."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith(prefix):
            sub = key[len(prefix) :]
            if not any(sub == d or sub.startswith(d + ".") for d in drop):
                out[sub] = value
    return out


def _require(ckpt: Mapping[str, Any], key: str, fmt: str) -> Mapping[str, Any]:
    if key not in ckpt or not isinstance(ckpt[key], Mapping):
        raise WeightsError(f"Expected a {fmt} checkpoint to hold a {key!r} dict, but its keys are {sorted(ckpt)[:10]}")
    return ckpt[key]


@CONVERTERS.register("plain")
def convert_plain(ckpt: Mapping[str, Any]) -> StateDict:
    """A bare backbone state dict: returned as is (a classifier ``head.*`` is dropped)."""
    return strip_prefix(ckpt, "", drop=("head",))


@CONVERTERS.register("dino_full")
def convert_dino_full(ckpt: Mapping[str, Any]) -> StateDict:
    """DINO full checkpoint -> teacher backbone (DINO evaluates the teacher, eval_knn.py ``checkpoint_key``)."""
    return strip_prefix(_require(ckpt, "teacher", "DINO full"), "backbone.")


@CONVERTERS.register("ibot_full")
def convert_ibot_full(ckpt: Mapping[str, Any]) -> StateDict:
    """iBOT full checkpoint -> teacher backbone without the mask token."""
    return strip_prefix(_require(ckpt, "teacher", "iBOT full"), "backbone.", drop=("masked_embed",))


@CONVERTERS.register("ibot_teacher")
def convert_ibot_teacher(ckpt: Mapping[str, Any]) -> StateDict:
    """iBOT ``checkpoint_teacher.pth`` -> backbone: drop the projection head and the mask token."""
    return strip_prefix(_require(ckpt, "state_dict", "iBOT teacher"), "", drop=("head", "masked_embed"))


@CONVERTERS.register("mocov3")
def convert_mocov3(ckpt: Mapping[str, Any]) -> StateDict:
    """MoCo-v3 -> ``module.base_encoder.*`` minus its projector ``head.*`` (moco-v3 main_lincls.py)."""
    return strip_prefix(_require(ckpt, "state_dict", "MoCo-v3"), "module.base_encoder.", drop=("head",))


@CONVERTERS.register("prosmin_bench")
def convert_prosmin_bench(ckpt: Mapping[str, Any]) -> StateDict:
    """This suite's pretraining checkpoint -> the target (EMA) network's backbone, as DINO evaluates its teacher."""
    return strip_prefix(_require(ckpt, "target", "prosmin-bench pretraining"), "backbone.")


def _looks_like_backbone(state: Mapping[str, Any]) -> bool:
    return any(k in state for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "conv1.weight", "stem.0.weight"))


def detect_format(ckpt: Any) -> str:
    """Name the format of a loaded checkpoint from its keys; unknown formats raise with the keys found."""
    if not isinstance(ckpt, Mapping):
        raise WeightsError(
            f"Expected a checkpoint holding a dict of tensors, but the file holds a {type(ckpt).__name__}"
        )
    if ckpt.get("format") == PRETRAIN_FORMAT:
        return "prosmin_bench"
    if "teacher" in ckpt and isinstance(ckpt["teacher"], Mapping):
        if "ibot_loss" in ckpt or any(k.startswith("backbone.masked_embed") for k in ckpt["teacher"]):
            return "ibot_full"
        return "dino_full"
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        inner = ckpt["state_dict"]
        if any(k.startswith("module.base_encoder.") for k in inner):
            return "mocov3"
        if _looks_like_backbone(inner):
            return "ibot_teacher"
    if _looks_like_backbone(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "plain"
    known = ", ".join(CONVERTERS.names())
    raise WeightsError(
        f"Unknown checkpoint format: top-level keys {sorted(map(str, ckpt))[:12]}; known formats: {known}. "
        "Pass a checkpoint in one of these formats, or convert it to a plain backbone state dict"
    )


def convert(ckpt: Any, fmt: str = "auto") -> tuple[StateDict, str]:
    """Convert a loaded checkpoint to a backbone state dict; returns ``(state_dict, format_name)``."""
    name = detect_format(ckpt) if fmt == "auto" else fmt
    return CONVERTERS.get(name)(ckpt), name
