"""Datasets: the registry, the mini data that ships with packages, and the generic sources.

A task card names its datasets either as ``"name:split"`` (a registered dataset) or as a table describing a
generic source, resolved relative to ``--data-root``::

    train = { source = "imagefolder", root = "flowers102/train" }
    train = { source = "hf", path = "cifar10", split = "train", image_column = "img", label_column = "label" }
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError
from . import bundled, imagenet  # noqa: F401  (register datasets)
from . import corruptions, imagenet_c, imagenet_o, subsets, transfer  # noqa: F401  (register datasets)
from .base import DATASETS, ArrayImageDataset, DatasetRef, DatasetSpec, FileImageDataset, ImageDataset, parse_ref
from .folder import list_image_folder

__all__ = [
    "DATASETS", "DatasetRef", "DatasetSpec", "ImageDataset", "ArrayImageDataset", "FileImageDataset",
    "resolve_dataset", "dataset_key", "list_image_folder", "parse_ref",
]


def resolve_dataset(ref: DatasetRef | str | Mapping[str, Any], data_root: Path | None = None) -> ImageDataset:
    """Load a dataset named by a card: ``"name:split"``, a generic-source table, or their DatasetRef."""
    ref = DatasetRef.parse(ref)
    if ref.registered:
        return DATASETS.get(ref.name).load(ref.split, data_root)
    table = dict(ref.table)
    source = table.get("source")
    if source == "imagefolder":
        root = Path(str(table.get("root", "")))
        if not root.is_absolute():
            if data_root is None:
                raise DataError(f"Image folder {str(root)!r} is relative: pass --data-root DIR that holds it")
            root = Path(data_root) / root
        return list_image_folder(root, name=f"imagefolder {root}")
    if source == "hf":
        from .hf import load_hf

        return load_hf(str(table["path"]), str(table.get("split", "train")), str(table.get("image_column", "image")),
                       str(table.get("label_column", "label")), data_root)
    raise DataError(f"Expected a dataset source 'imagefolder' or 'hf', but got {source!r} in {table}")


def dataset_key(ref: DatasetRef | str | Mapping[str, Any]) -> str:
    """A short human-readable identity for logs and cache metadata (:attr:`DatasetRef.key`)."""
    return DatasetRef.parse(ref).key
