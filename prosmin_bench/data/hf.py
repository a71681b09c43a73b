"""Hugging Face ``datasets`` source: hub ids (when online) or local parquet / imagefolder data.

``load_hf(path, split, image_column, label_column)`` where ``path`` is a hub id (``"cifar10"``), a folder of
parquet files, or a folder in the ``imagefolder`` layout. Offline (``HF_DATASETS_OFFLINE=1``) only local data and
the local HF cache are used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from .base import ImageDataset, to_rgb


class HFImageDataset(ImageDataset):
    """Wraps a ``datasets.Dataset`` with an image column and an integer label column."""

    def __init__(self, ds: Any, image_column: str, label_column: str, fingerprint: str) -> None:
        super().__init__()
        for col in (image_column, label_column):
            if col not in ds.column_names:
                raise DataError(
                    f"HF dataset has no column {col!r}; its columns are {ds.column_names}. "
                    "Set image_column / label_column in the dataset entry"
                )
        self.ds = ds
        self.image_column = image_column
        self.labels = np.asarray(ds[label_column], dtype=np.int64)
        feat = ds.features.get(label_column)
        names = getattr(feat, "names", None)
        n = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.class_names = list(names) if names else [str(i) for i in range(n)]
        self.fingerprint = fingerprint

    def get_image(self, index: int) -> Image.Image:
        img = self.ds[int(index)][self.image_column]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb(img)


def load_hf(path: str, split: str, image_column: str = "image", label_column: str = "label",
            data_root: Path | None = None) -> HFImageDataset:
    """Load ``split`` of an HF dataset; ``path`` relative to ``data_root`` when that folder exists there."""
    import datasets

    local = Path(path)
    if not local.is_absolute() and data_root is not None and (Path(data_root) / path).exists():
        local = Path(data_root) / path
    try:
        if local.is_dir():
            parquet = sorted(local.rglob("*.parquet"))
            if parquet:
                files = [str(p) for p in parquet if split in p.name or split in p.parent.name] or [str(p) for p in parquet]
                ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
            else:
                ds = datasets.load_dataset("imagefolder", data_dir=str(local), split=split)
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as exc:  # datasets raises many types; one clear message with the cause
        raise DataError(
            f"Could not load HF dataset {path!r} split {split!r} ({type(exc).__name__}: {str(exc)[:160]}). "
            "Give a local parquet/imagefolder path under --data-root, or run once online to fill the HF cache"
        ) from None
    # Local data is named by its resolved folder, so two copies of one layout under two data roots stay apart.
    where = str(local.resolve()) if local.is_dir() else path
    fp = hashlib.sha256(f"{where}|{split}|{getattr(ds, '_fingerprint', '')}|{len(ds)}".encode()).hexdigest()[:32]
    return HFImageDataset(ds, image_column, label_column, fp)
