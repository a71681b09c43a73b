"""Checks of a whole pretraining config: every number in its range, every choice one of its values, before any
work starts (``--set optim.batch_size=0`` or ``optim.lr=nan`` must not surface mid-run as a crash or NaN)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import ConfigError
from ..registry import NAME_RULE, is_safe_name
from .config import PretrainConfig


def _where(key: str) -> str:
    """A config path as a user writes it in ``--set`` (``method_config.lam`` is ``method.lam``)."""
    return "method." + key[len("method_config."):] if key.startswith("method_config.") else key


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (dotted key, value) of a config; a tuple's items are ``key[i]``."""
    if dataclasses.is_dataclass(obj):
        return [kv for f in dataclasses.fields(obj) for kv in _leaves(getattr(obj, f.name), f"{prefix}{f.name}.")]
    if isinstance(obj, tuple):
        return [kv for i, v in enumerate(obj) for kv in _leaves(v, f"{prefix[:-1]}[{i}].")]
    return [(prefix[:-1], obj)]


#: (key, lowest, highest, what) for the numbers whose range does not depend on the method; None: unbounded.
_RANGES: tuple[tuple[str, float | None, float | None, str], ...] = (
    ("data.num_workers", 0, None, "a non-negative integer"),
    ("crops.global_crops", 1, None, "a positive integer"),
    ("crops.local_crops", 0, None, "a non-negative integer"),
    ("crops.global_size", 1, None, "a positive integer"),
    ("crops.local_size", 1, None, "a positive integer"),
    *((f"crops.{k}", 0, 1, "in [0, 1]") for k in ("flip_p", "jitter_p", "grayscale_p", "solarize_p")),
    *((f"crops.blur_p[{i}]", 0, 1, "in [0, 1]") for i in range(3)),
    *((f"crops.{k}", 0, None, "a non-negative number")
      for k in ("brightness", "contrast", "saturation", "rotation_deg", "shear_deg", "noise_std")),
    ("crops.hue", 0, 0.5, "in [0, 0.5]"),
    ("optim.epochs", 1, None, "a positive integer"),
    ("optim.batch_size", 1, None, "a positive integer"),
    *((f"optim.{k}", 0, None, "a non-negative number")
      for k in ("lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                "freeze_last_layer_epochs")),
    *((f"optim.betas[{i}]", 0, 0.999999, "in [0, 1)") for i in range(2)),
    ("run.seed", 0, 2**32 - 1, "an integer in [0, 2**32 - 1]"),
    ("run.checkpoint_every_steps", 1, None, "a positive integer"),
    ("run.log_every_steps", 1, None, "a positive integer"),
    ("run.max_steps", 1, None, "a positive integer or none"),
    ("run.monitor_every", 0, None, "a non-negative integer"),
    ("run.collapse_warn_fraction", 0, 1, "in [0, 1]"),
)
_CHOICES = {"crops.backend": ("pil", "tensor"), "data.dataset": ("digits", "imagenet"),
            "run.precision": ("auto", "bf16", "fp16", "fp32")}
#: (lowest, low open, highest, high open) of a range given as a pair
_PAIRS = {"crops.global_scale": (0, True, 1, False), "crops.local_scale": (0, True, 1, False),
          "crops.ratio": (0, True, None, False), "crops.blur_sigma": (0, True, None, False)}


def _method_range(name: str) -> tuple[float, float | None, str]:
    """Bounds of a method knob, from its name: widths and counts positive, EMA momenta in [0, 1], the rest >= 0."""
    if name.endswith("dim") or name.endswith("nlayers"):
        return 1, None, "a positive integer"
    if name == "n_samples":  # the scores' pairwise term averages over r (r - 1) sample pairs
        return 2, None, "an integer >= 2"
    if "momentum" in name:
        return 0, 1, "in [0, 1]"
    if name == "drop_path_rate":
        return 0, 0.999999, "in [0, 1)"
    return 0, None, "a non-negative number"


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Refuse a config that cannot train as meant (``--set optim.batch_size=0``, ``optim.lr=nan``...) before any
    work, with a ConfigError naming the key as ``--set`` spells it; returns ``cfg``."""
    if not is_safe_name(cfg.recipe):  # the recipe names the checkpoint folder
        raise ConfigError(f"Expected recipe to be a name of {NAME_RULE}, but got {cfg.recipe!r}")
    leaves = dict(_leaves(cfg))
    for key, value in leaves.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"Expected {_where(key)} to be a finite number, but got {value}")
    checks = [(k, lo, hi, what) for k, lo, hi, what in _RANGES]
    checks += [(k, *_method_range(k.rsplit(".", 1)[-1])) for k, v in leaves.items()
               if k.startswith("method_config.") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for key, lo, hi, what in checks:
        value = leaves[key]
        if value is None and key == "run.max_steps":
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"Expected {_where(key)} to be {what}, but got {value}")
    for key, choices in _CHOICES.items():
        if leaves[key] not in choices:
            raise ConfigError(f"Expected {key} to be one of {list(choices)}, but got {leaves[key]!r}")
    for key, (lo, lo_open, hi, hi_open) in _PAIRS.items():
        a, b = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if not ((a > lo if lo_open else a >= lo) and a <= b and (hi is None or b <= hi)):
            span = f"{lo} < low <= high" + (f" <= {hi}" if hi is not None else "")
            raise ConfigError(f"Expected {key} to be two numbers with {span}, but got {[a, b]}")
    if not all(v > 0 for v in cfg.data.std):  # the views are divided by it
        raise ConfigError(f"Expected data.std to be 3 positive numbers, but got {list(cfg.data.std)}")
    return cfg
