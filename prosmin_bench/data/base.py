"""DatasetSpec and the image datasets every source returns.

A dataset reference is ``"<name>:<split>"`` (e.g. ``digits:train``, ``imagenet:val``) or a generic source table,
parsed once into a ``DatasetRef`` (resolved by ``prosmin_bench.data.resolve_dataset``). Each named dataset is a
``DatasetSpec`` registered in ``DATASETS``: metadata (version, where it comes from, the expected layout) plus a
loader ``load(split, data_root) -> ImageDataset``. Listing datasets never reads data.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..registry import Registry

log = logging.getLogger(__name__)


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

    def fingerprint_for(self, data_hash: str = "stat") -> str:
        """The fingerprint under ``data_hash`` (one of :data:`DATA_HASHES`). Only file-backed data tells the two
        apart; in-memory data is always fingerprinted by content."""
        check_data_hash(data_hash)
        return self.fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def get_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):
        img = self.get_image(index)
        return (self.transform(img) if self.transform is not None else img), int(self.labels[index])

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> "ImageDataset":
        """A shallow copy whose items pass through ``transform``."""
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
        # The given name keeps the fingerprint readable; the digest makes it follow the pixels and labels, so data
        # regenerated differently (another scikit-image, an edited digits_c file) never meets stale features.
        self.fingerprint = f"{fingerprint}-{array_digest(images, self.labels)}"

    def get_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


#: Integer grey modes Pillow gives 16-bit images (PNG, TIFF; "I" from older Pillow or a conversion); their values span
#: 0..65535, which ``convert("RGB")`` clips at 255 (every pixel above 1/257 of full scale turns white).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit grey is scaled to 8 bits (value / 257, rounded: 257 * v8 reads back as v8);
    16-bit colour PNGs already arrive as 8-bit "RGB"/"RGBA" from Pillow; every other mode is Pillow's conversion."""
    if image.mode in _WIDE_GREY_MODES:
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


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
        self._content_fingerprint: str | None = None

    def fingerprint_for(self, data_hash: str = "stat") -> str:
        """``"stat"``: :attr:`fingerprint` (sizes and mtimes, no image read); ``"content"``: the sha256 of every
        file's bytes (reads the whole dataset once per process)."""
        check_data_hash(data_hash)
        if data_hash == "stat":
            return self.fingerprint
        if self._content_fingerprint is None:
            log.info("hashing the bytes of %d image files under %s (--data-hash content)", len(self.paths),
                     self.root or "their folders")
            self._content_fingerprint = file_list_fingerprint(self.paths, self.labels, self.root, content=True)
        return self._content_fingerprint

    def get_image(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return to_rgb(im)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"Image {path!r} is unreadable or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
                "replace or delete the file and run again"
            ) from None


#: How image files are fingerprinted for the feature cache: "stat" reads only file metadata (fast enough for
#: ImageNet's 1.28M files), "content" hashes every file's bytes (catches an edit that keeps size and mtime).
DATA_HASHES = ("stat", "content")


def check_data_hash(data_hash: str) -> None:
    if data_hash not in DATA_HASHES:
        raise DataError(f"Expected data hash 'stat' or 'content', but got {data_hash!r}")


def array_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 (16 hex digits) of an in-memory dataset's shape, pixels and labels."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype.str}\n".encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return h.hexdigest()[:16]


def file_list_fingerprint(paths: Sequence[str], labels: np.ndarray, root: str | os.PathLike | None,
                          *, content: bool = False) -> str:
    """sha256 over the resolved root and, per file, its path relative to it, its label and either its size and
    mtime (no image read) or, with ``content``, the sha256 of its bytes.

    The root is resolved (absolute, symlinks followed) so another copy of the same layout under another
    ``--data-root`` is another dataset, while a symlink to the same folder is the same one.
    """
    h = hashlib.sha256(f"content={content}\n".encode())
    base = Path(root) if root is not None else None
    if base is not None:
        h.update(f"root={os.path.realpath(base)}\n".encode())
    for p, y in zip(paths, labels.tolist()):
        rel = os.path.relpath(p, base) if base is not None else os.path.realpath(p)
        h.update(f"{rel}\0{y}\0{_file_identity(p, content)}\n".encode())
    return h.hexdigest()[:32]


def _file_identity(path: str, content: bool) -> str:
    """``size:mtime_ns`` of a file, or ``size:sha256`` of its bytes; ``missing`` when it cannot be read (the
    loader then fails on it with the file's name)."""
    try:
        if not content:
            st = os.stat(path)
            return f"{st.st_size}:{st.st_mtime_ns}"
        with open(path, "rb") as f:
            return f"{os.fstat(f.fileno()).st_size}:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    except OSError:
        return "missing"


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


#: Types a generic source table's fields may hold (TOML scalars): the table is compared and hashed by value.
_TABLE_VALUES = (str, int, float, bool)


@dataclass(frozen=True, eq=False)
class DatasetRef:
    """A task card's dataset reference, parsed once: a registered dataset's ``name`` and ``split``
    (``"digits:train"``), or the fields of a generic source table (``{ source = "imagefolder", root = ... }``), kept
    in the card's order (messages show them as written) and compared regardless of it (as the card's table was)."""

    name: str = ""
    split: str = ""
    table: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, ref: "DatasetRef | str | Mapping[str, Any]") -> "DatasetRef":
        """``"name:split"`` or a source table, as a card writes it (a DatasetRef is returned as it is)."""
        if isinstance(ref, DatasetRef):
            return ref
        if isinstance(ref, str):
            return cls(*parse_ref(ref))
        if isinstance(ref, Mapping):
            bad = [k for k, v in ref.items() if not isinstance(v, _TABLE_VALUES)]
            if bad:
                raise DataError(f"Expected text or numbers in a dataset source table, but field(s) {bad} of "
                                f"{dict(ref)} hold something else")
            return cls(table=tuple((str(k), v) for k, v in ref.items()))
        raise TypeError(f"Expected a dataset reference 'name:split' or a source table, but got {ref!r}")

    @property
    def registered(self) -> bool:
        """Whether this names a registered dataset (else it is a generic source table)."""
        return not self.table

    @property
    def raw(self) -> str | dict[str, Any]:
        """The reference as the card wrote it: what records store, and what :meth:`parse` reads back."""
        return f"{self.name}:{self.split}" if self.registered else dict(self.table)

    @property
    def key(self) -> str:
        """A short readable identity for logs and feature cache keys: ``digits@1:train``, or the table's sorted
        ``field=value`` pairs."""
        if self.registered:
            return f"{self.name}@{DATASETS.get(self.name).version}:{self.split}"
        return ",".join(f"{k}={v}" for k, v in sorted(self.table))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DatasetRef):
            return NotImplemented
        return (self.name, self.split, frozenset(self.table)) == (other.name, other.split, frozenset(other.table))

    def __hash__(self) -> int:
        return hash((self.name, self.split, frozenset(self.table)))

    def __str__(self) -> str:
        return self.raw if self.registered else self.key


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
