"""DatasetSpec and the image datasets every source returns.

A dataset reference is ``"<name>:<split>"`` (e.g. ``digits:train``, ``imagenet:val``). Each named dataset is a
``DatasetSpec`` registered in ``DATASETS``: metadata (version, where it comes from, the expected layout) plus a
loader ``load(split, data_root) -> ImageDataset``. Listing datasets never reads data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..registry import Registry


class ImageDataset(torch.utils.data.Dataset):
    """Images with integer labels. ``__getitem__(i) -> (transform(PIL image), label)``.

    Attributes:
        labels: int64 array [N].
        class_names: list of class names (index = label).
        fingerprint: a string that changes whenever the content changes (used in feature cache keys).
    """

    labels: np.ndarray
    class_names: list[str]
    fingerprint: str

    def __init__(self) -> None:
        self.transform: Callable[[Image.Image], Any] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def get_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):
        img = self.get_image(index)
        return (self.transform(img) if self.transform is not None else img), int(self.labels[index])

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> "ImageDataset":
        """A shallow copy whose items pass through ``transform``."""
        import copy

        new = copy.copy(self)
        new.transform = transform
        return new

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ArrayImageDataset(ImageDataset):
    """In-memory uint8 images [N, H, W, 3] (the mini data)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], class_names: list[str], fingerprint: str) -> None:
        super().__init__()
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"Expected uint8 images of shape [N, H, W, 3], but got {images.dtype} {images.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.fingerprint = fingerprint

    def get_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


class FileImageDataset(ImageDataset):
    """Images read from files on demand (image folders, ImageNet layouts).

    Unreadable or truncated files raise a DataError naming the file (policy: fail loudly with the path, so a
    corrupt download is fixed rather than silently averaged away).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], class_names: list[str],
                 root: str | os.PathLike | None = None, fingerprint: str | None = None) -> None:
        super().__init__()
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.root = str(root) if root is not None else None
        self.fingerprint = fingerprint or file_list_fingerprint(self.paths, self.labels, root)

    def get_image(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"Image {path!r} is unreadable or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
                "replace or delete the file and run again"
            ) from None


def file_list_fingerprint(paths: Sequence[str], labels: np.ndarray, root: str | os.PathLike | None) -> str:
    """sha256 over relative paths, sizes and labels: cheap (no image reads), changes when files change."""
    h = hashlib.sha256()
    base = Path(root) if root is not None else None
    for p, y in zip(paths, labels.tolist()):
        rel = os.path.relpath(p, base) if base is not None else p
        try:
            size = os.path.getsize(p)
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\0{y}\n".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class DatasetSpec:
    """Metadata for a named dataset and how to load its splits.

    Args:
        name: registry name (``digits``, ``imagenet``, ...).
        version: bump when the data a loader yields changes (it is part of feature cache keys).
        splits: split names the loader accepts.
        loader: ``loader(split, data_root) -> ImageDataset``.
        scale: "mini" (embedded, offline) or "imagenet" (needs ``--data-root`` or an HF id).
        source: where the data comes from (shown by ``prosmin-bench data check``).
        layout: the expected on-disk layout under the data root, if any.
        num_classes: number of classes, when fixed.
    """

    name: str
    version: str
    splits: tuple[str, ...]
    loader: Callable[[str, Path | None], ImageDataset] = field(compare=False, repr=False)
    scale: str = "mini"
    source: str = ""
    layout: str = ""
    num_classes: int | None = None
    description: str = ""

    def load(self, split: str, data_root: Path | None = None) -> ImageDataset:
        if split not in self.splits:
            raise DataError(f"Dataset {self.name!r} has no split {split!r}; expected one of {list(self.splits)}")
        return self.loader(split, data_root)


DATASETS: Registry[DatasetSpec] = Registry("dataset", "prosmin-bench data check")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.add(spec.name, spec, origin=getattr(spec.loader, "__module__", ""))


def parse_ref(ref: str) -> tuple[str, str]:
    """``"digits:train"`` -> ("digits", "train")."""
    if ":" not in ref:
        raise DataError(f"Expected a dataset reference 'name:split' (e.g. 'digits:train'), but got {ref!r}")
    name, split = ref.split(":", 1)
    return name, split


def load_dataset_ref(ref: str, data_root: Path | None = None) -> ImageDataset:
    """Load ``"name:split"`` through the dataset registry."""
    name, split = parse_ref(ref)
    return DATASETS.get(name).load(split, data_root)


def dataset_version(ref: str) -> str:
    name, _ = parse_ref(ref)
    return DATASETS.get(name).version


def require_root(name: str, data_root: Path | None, sub: str, layout: str, source: str) -> Path:
    """``data_root / sub`` if it is a folder, else a DataError saying what was expected and how to get it."""
    if data_root is None:
        raise DataError(
            f"Dataset {name!r} needs a data root: pass --data-root DIR (or set PROSMIN_BENCH_DATA) with {layout}. "
            f"Source: {source}"
        )
    path = Path(data_root) / sub
    if not path.is_dir():
        nearest = path.parent  # the deepest folder that exists on the way, to show what is there instead
        while nearest != Path(data_root) and not nearest.is_dir():
            nearest = nearest.parent
        raise DataError(
            f"Dataset {name!r}: {str(path)!r} does not exist; expected {layout}, but {_found(nearest)}. "
            f"Source: {source}"
        )
    return path


def _found(folder: Path, limit: int = 5) -> str:
    """What a folder holds, for error messages: "found [a/, b.txt] in <folder>", "<folder> is empty", ..."""
    if not folder.exists():
        return f"{str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"{str(folder)!r} is a file, not a folder"
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        return f"{str(folder)!r} cannot be read ({exc.strerror})"
    if not entries:
        return f"{str(folder)!r} is empty"
    shown = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"found {shown}{more} in {str(folder)!r}"
