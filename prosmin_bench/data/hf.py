"""Hugging Face ``datasets`` source: hub ids (offline: from the HF cache only) or local parquet / imagefolder data.

``load_hf(path, split, image_column, label_column)`` where ``path`` is a hub id (``"cifar10"``) or a local folder,
read by ``datasets.load_dataset(folder, split=...)`` with the library's own data-files conventions: file or folder
names give the splits (``train.parquet``, ``data/test-00000-of-00001.parquet``, ``train/<class>/<image>`` for an
image folder; ``valid``/``val``/``dev`` name ``validation``, ``eval``/``testing`` name ``test``), and a folder
whose files name no split is all ``train``. A split the data does not have is refused with the splits it has.
Offline (``HF_DATASETS_OFFLINE=1``) only local data and the local HF cache are used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from .base import ImageDataset, check_data_hash, file_list_fingerprint, to_rgb

log = logging.getLogger(__name__)


class HFImageDataset(ImageDataset):
    """Wraps a ``datasets.Dataset`` with an image column and an integer label column.

    ``files`` are what the fingerprint follows: the data files of the split for a local folder (under ``root``), the
    Arrow files of the HF cache for a hub id (their path holds the hub revision); see :func:`hf_fingerprint`.
    """

    def __init__(self, ds: Any, image_column: str, label_column: str, split: str, files: list[str],
                 root: Path | None = None) -> None:
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
        self._identity = (f"{split}|{image_column}|{label_column}|{len(ds)}", files, root)
        self.fingerprint = hf_fingerprint(*self._identity)
        self._content_fingerprint: str | None = None

    def fingerprint_for(self, data_hash: str = "stat") -> str:
        """``"stat"``: :attr:`fingerprint` (sizes and mtimes of its files); ``"content"``: their bytes' sha256."""
        check_data_hash(data_hash)
        if data_hash == "stat":
            return self.fingerprint
        if self._content_fingerprint is None:
            log.info("hashing the bytes of %d HF data files (--data-hash content)", len(self._identity[1]))
            self._content_fingerprint = hf_fingerprint(*self._identity, content=True)
        return self._content_fingerprint

    def get_image(self, index: int) -> Image.Image:
        img = self.ds[int(index)][self.image_column]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb(img)


def hf_fingerprint(tag: str, files: list[str], root: Path | None, *, content: bool = False) -> str:
    """sha256 (32 hex digits) of ``tag`` (split, columns, length) and ``files`` as
    :func:`base.file_list_fingerprint` sees them: relative to the resolved ``root`` (so two copies of one layout under
    two data roots stay apart) with size and mtime, or with ``content`` the sha256 of their bytes."""
    files = sorted(files)
    listing = file_list_fingerprint(files, np.zeros(len(files), dtype=np.int64), root, content=content)
    return hashlib.sha256(f"hf|{tag}|{listing}".encode()).hexdigest()[:32]


def split_names(split: str) -> list[str]:
    """The split names in a ``datasets`` split expression: ``"train[:10%]+test"`` -> ["train", "test"]."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def load_hf(path: str, split: str, image_column: str = "image", label_column: str = "label",
            data_root: Path | None = None) -> HFImageDataset:
    """Load ``split`` of an HF dataset; ``path`` relative to ``data_root`` when that folder exists there."""
    import datasets

    local: Path | None = Path(path)
    if not local.is_absolute() and data_root is not None and (Path(data_root) / path).exists():
        local = Path(data_root) / path
    local = local if local.is_dir() else None
    target = str(local) if local is not None else path
    try:
        ds = datasets.load_dataset(target, split=split)
    except Exception as exc:  # datasets raises many types; one clear message with the cause
        message = _unknown_split_message(path, target, split, local) or (
            f"Could not load HF dataset {path!r} split {split!r} ({type(exc).__name__}: {str(exc)[:160]}). "
            "Give a local parquet/imagefolder path under --data-root, or run once online to fill the HF cache")
        raise DataError(message) from None
    files: list[str] = []
    if local is not None:  # the split's own data files, as datasets resolved them
        found = datasets.load_dataset_builder(target).config.data_files or {}
        by_name = {str(name): list(listed) for name, listed in found.items()}
        files = [f for name in split_names(split) for f in by_name.get(name, [])]
    # A hub id (or data files declared otherwise, e.g. by a README's configs): the Arrow files of the HF cache,
    # whose path holds the builder's hash of its sources (the hub revision, or local paths and mtimes).
    files = files or [f["filename"] for f in ds.cache_files]
    return HFImageDataset(ds, image_column, label_column, split, files, local)


def _unknown_split_message(path: str, target: str, split: str, local: Path | None) -> str | None:
    """The message naming the splits the data has when ``split`` asks for another one; None otherwise."""
    import datasets

    try:
        have = [str(s) for s in datasets.get_dataset_split_names(target)]
    except Exception:  # the data itself cannot be read: the caller's message says why
        return None
    missing = [name for name in split_names(split) if name not in have]
    if not missing or not have:
        return None
    asked = f" (asked for split {split!r})" if split != missing[0] else ""
    how = "" if local is None else " (datasets names them by file and folder names; files naming no split are train)"
    return (f"HF dataset {path!r} has no split {missing[0]!r}{asked}; its splits are {have}{how}. Set split = "
            f"\"{have[0]}\" (or another of them) in the dataset entry of the card, see docs/cards.md")
