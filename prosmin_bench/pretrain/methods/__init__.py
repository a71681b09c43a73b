"""Pretraining methods. ``METHODS`` maps a name to a :class:`PretrainMethod` subclass (see ``base.py`` for the
interface the training loop relies on).

Every module in this package is imported here, so a method registers itself by being a file in this folder
that decorates its class with ``@METHODS.register("name")`` (and its networks in ``models/networks.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from ..config import ConfigError, PretrainConfig
from .base import (
    METHODS,
    BackboneFactory,
    MethodConfig,
    MultiCropBatch,
    PretrainMethod,
    Progress,
    build_backbone_factory,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def config_from_dict(d: Mapping[str, Any]) -> PretrainConfig:
    """A saved config (``PretrainConfig.to_dict()``, e.g. a checkpoint's ``"config"``) as the typed config, its
    method's knobs typed by that method's config class."""
    if "method" not in d:
        raise ConfigError("Expected a pretraining config dict with a 'method' key; the checkpoint is damaged")
    return PretrainConfig.from_dict(d, METHODS.get(d["method"]).config_class)


__all__ = [
    "METHODS",
    "BackboneFactory",
    "MethodConfig",
    "MultiCropBatch",
    "PretrainMethod",
    "Progress",
    "build_backbone_factory",
    "config_from_dict",
]
