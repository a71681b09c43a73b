"""Typed pretraining configuration: data, multi-crop augmentation, optimisation, run control.

Every default here is the paper's / released code's value unless the comment says otherwise; recipes
(``recipes.py``) set the values that differ per recipe, each with its source. A method's own knobs live in that
method's config dataclass (``methods/base.py`` ``MethodConfig`` and subclasses).

Overrides come as dotted keys (``optim.lr=1e-3``, ``method.lam=0.3``, ``crops.local_crops=4``); strings are
converted to the field's type, so ``--set key=value`` on the command line and ``overrides={...}`` in Python
share one path.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where pretraining images come from.

    ``dataset``: ``"digits"`` (the bundled digits train split, in memory; the mini scale) or ``"imagenet"``
    (``<data_root>/imagenet/train/<wnid>/*.JPEG``). Pretraining reads the train split only.
    """

    dataset: str = "digits"
    data_root: str | None = None
    num_workers: int = 8  # per process, for the PIL (ImageNet) path; the tensor path needs none
    # Normalisation applied after augmentation; must equal the evaluation preprocessing of the model that the
    # recipe produces (ImageNet mean/std for *_vits16; 0.5/0.5 for the mini scale, models/spec.py MINI_PREPROCESS).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop views (DINO, Caron et al. 2021; ProSMin uses DINO's recipe: docs/protocols.md "Multi-crop").

    ``backend="pil"`` is DINO's per-image torchvision pipeline (RandomResizedCrop, flip, colour jitter, grayscale,
    blur, solarize) run in DataLoader workers. ``backend="tensor"`` is a batched on-device pipeline for small
    images (random resized crop as an affine warp via ``affine_grid``/``grid_sample``, optional small rotation
    and shear, brightness/contrast jitter, Gaussian noise), several times faster than per-image PIL on 32-px
    data (docs/protocols.md "Measured here on the mini data"); its randomness is drawn per image from (seed, epoch,
    image index), so it does not depend on batch split, world size or resumption.
    """

    backend: str = "pil"
    global_crops: int = 2  # DINO/ProSMin: 2 global views, the only ones the target sees
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)  # released code default --global_crops_scale
    local_crops: int = 16  # ProSMin released code --local_crops_number 16 (DINO: 10)
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)  # released code --local_crops_scale
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default
    flip_p: float = 0.5  # DINO flip_and_color_jitter
    jitter_p: float = 0.8  # DINO: ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local (DINO GaussianBlur)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # DINO GaussianBlur radius range, in pixels of the output view
    solarize_p: float = 0.2  # second global view only (DINO)
    # tensor backend only (not in DINO; for digits, which are not flip-invariant and too small to crop hard)
    rotation_deg: float = 0.0
    shear_deg: float = 0.0
    noise_std: float = 0.0  # Gaussian pixel noise in [0, 1] units, before normalisation

    @property
    def n_views(self) -> int:
        return self.global_crops + self.local_crops


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with DINO's schedules (docs/protocols.md "Optimisation")."""

    epochs: int = 800  # ProSMin paper: 300 or 800 epochs
    batch_size: int = 512  # global batch (all processes); paper: 512 on 8 GPUs
    lr: float = 0.0005  # peak lr per 256 images (paper; linear scaling lr * batch / 256)
    min_lr: float = 1e-6  # end of the cosine decay (paper, released code)
    warmup_epochs: float = 30.0  # paper (released code: 10)
    weight_decay: float = 0.04  # paper, cosine to weight_decay_end (released code: 0.065 -> 0.65)
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # released code --clip_grad; 0 disables
    betas: tuple[float, float] = (0.9, 0.999)  # torch AdamW default, as in DINO / the released code
    freeze_last_layer_epochs: float = 0.0  # released code --freeze_last_layer 0 (DINO: 1)


@dataclass(frozen=True)
class RunConfig:
    """How a run is executed: seeds, precision, logging and checkpoint cadence."""

    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on a GPU that supports it, fp16 + GradScaler on older GPUs, fp32 on CPU
    checkpoint_every_steps: int = 1000
    log_every_steps: int = 1  # JSONL log line every N steps
    max_steps: int | None = None  # stop after this many steps (schedules still span all epochs); None: run to the end
    # Collapse statistics (effective rank, per-dimension std) of the target's outputs on the current batch every N
    # steps; 0 turns them off. Cost on one CPU thread: ~10 ms for the micro batch, 0.15 s for a [128, 12000]
    # ViT-S/16 per-GPU batch; 50 gives several points even in a 330-step micro run.
    monitor_every: int = 50
    # Warn once when an effective rank falls below this fraction of min(batch - 1, width) after being above it:
    # vit_micro's random-init target backbone sits at 0.16 on a digits batch (15 of 96), the collapsed micro
    # runs of docs/protocols.md at 0.03-0.08 (on test features).
    collapse_warn_fraction: float = 0.1


@dataclass(frozen=True)
class PretrainConfig:
    """The full typed config of a pretraining run; stored as a plain dict in every checkpoint."""

    recipe: str
    method: str
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method_config: Any = None  # an instance of the method's MethodConfig subclass
    data: DataConfig = field(default_factory=DataConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists for tuples) safe for ``torch.save`` + ``torch.load(weights_only=True)`` and JSON."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], method_config_class: type) -> "PretrainConfig":
        """:meth:`to_dict`'s output as the typed config, its ``method_config`` typed by ``method_config_class``
        (the method's config class: ``methods.config_from_dict`` picks it by the method's name)."""
        d = dict(d)
        mc = d.pop("method_config", None) or {}
        cfg = _from_dict(cls, {**d, "method_config": None}, "config")
        return dataclasses.replace(cfg, method_config=_from_dict(method_config_class, mc, "method"))


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, d: Mapping[str, Any], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"Expected a mapping for {where}, but got {type(d).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where}; expected some of {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (a JSON-ish value or a string from the command line) to annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"Cannot convert {value!r} for {where}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Expected a sequence for {where}, but got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"Expected {len(args)} values for {where}, but got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"Expected a JSON object for {where}, but got {value!r}") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"Expected a mapping for {where}, but got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"Expected true or false for {where}, but got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"Expected an integer for {where}, but got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"Expected an integer for {where}, but got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"Expected a number for {where}, but got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"Expected a number for {where}, but got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"Expected a string for {where}, but got {value!r}")
        return value
    return value


#: Short prefixes accepted in overrides: ``method.lam`` means ``method_config.lam``.
_ALIASES = {"method": "method_config"}


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["optim.lr=1e-3", ...]`` (repeated ``--set KEY=VALUE`` options) -> ``{"optim.lr": "1e-3", ...}``, keys and
    values stripped; a ConfigError for an item without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"Expected --set KEY=VALUE, but got {item!r}")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(cfg: PretrainConfig, overrides: Mapping[str, Any] | None) -> PretrainConfig:
    """Return ``cfg`` with dotted-key overrides applied, e.g. ``{"optim.lr": "1e-3", "method.lam": 0.3}``.

    Top-level scalar keys (``seed``-like run keys live under ``run.``) and ``arch_kwargs.NAME`` are accepted.
    Raises ConfigError naming the key and the accepted keys when a key does not exist.
    """
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if not parts or not all(parts):
            raise ConfigError(f"Expected an override key like 'optim.lr', but got {key!r}")
        if len(parts) > 1:  # "method.lam" is a method knob; a bare "method" is the method's name
            parts[0] = _ALIASES.get(parts[0], parts[0])
        elif parts[0] == "data_root":  # --data-root on the command line
            parts = ["data", "data_root"]
        cfg = _set_path(cfg, parts, value, key)
    return cfg


def _set_path(obj: Any, parts: list[str], value: Any, key: str) -> Any:
    name, rest = parts[0], parts[1:]
    if isinstance(obj, dict):  # arch_kwargs.NAME: free-form, values parsed as JSON scalars when possible
        if rest:
            raise ConfigError(f"Override {key!r} goes too deep: {name!r} is a plain value")
        new = dict(obj)
        new[name] = _parse_scalar(value)
        return new
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"Override {key!r} goes too deep")
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else f"; expected one of {names}"
        raise ConfigError(f"Unknown config key {name!r} in override {key!r}{hint}")
    current = getattr(obj, name)
    if rest:
        return dataclasses.replace(obj, **{name: _set_path(current, rest, value, key)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"Override {key!r} names a section; set one of its keys, e.g. {key}.<name>=VALUE")
    tp = _hints(type(obj))[name]
    return dataclasses.replace(obj, **{name: _coerce(value, tp, key)})


def _parse_scalar(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
