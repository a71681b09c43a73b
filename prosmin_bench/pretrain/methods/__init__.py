"""Pretraining methods. ``METHODS`` maps a name to a :class:`PretrainMethod` subclass (see ``base.py`` for the
interface the training loop relies on).

Every module in this package is imported here, so a method registers itself by being a file in this folder
that decorates its class with ``@METHODS.register("name")``.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    METHODS,
    BackboneFactory,
    MethodConfig,
    MultiCropBatch,
    PretrainMethod,
    Progress,
    build_backbone_factory,
    embed_dim_of,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "BackboneFactory",
    "MethodConfig",
    "MultiCropBatch",
    "PretrainMethod",
    "Progress",
    "build_backbone_factory",
    "embed_dim_of",
]
