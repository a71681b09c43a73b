"""One label space per task: the label of an image is the index of its class name in the training split's class list.

Sources list their classes per split (an image folder: its sorted subfolder names), so a test folder that lacks one
class would give every class after it another index than in train, and a probe would be scored against shifted
labels (50% on data it separates perfectly). A task's evaluation splits are therefore re-labelled by class name
with :func:`align_labels`; a class with images in an evaluation split but none in train is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from .base import ImageDataset


class RelabelledImageDataset(ImageDataset):
    """``base`` with its labels re-indexed into another class list; images (and ``paths``, ``root``, ...) are the
    base's, in the same order."""

    def __init__(self, base: ImageDataset, labels: np.ndarray, class_names: list[str]) -> None:
        super().__init__()
        self.base = base
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        # The mapping follows from the base's class names and the target list; both enter the fingerprint, so
        # features cached with these labels never meet the base's own.
        blob = json.dumps([list(base.class_names), self.class_names])
        self._digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.fingerprint = f"{base.fingerprint}|classes={self._digest}"

    def fingerprint_for(self, data_hash: str = "stat") -> str:
        return f"{self.base.fingerprint_for(data_hash)}|classes={self._digest}"

    def get_image(self, index: int) -> Image.Image:
        return self.base.get_image(index)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this wrapper lacks; dunders and `base` itself are excluded so copy and pickle
        # (DataLoader workers) never recurse before `base` is set.
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def describe(ref: str | Mapping[str, Any], dataset: ImageDataset) -> str:
    """A split as a user named it, for messages: ``'cifar10:test'``, an image folder's path, an HF path and split."""
    if isinstance(ref, str):
        return repr(ref)
    root = getattr(dataset, "root", None)
    if root:
        return repr(str(root))
    return " ".join(f"{k}={v!r}" for k, v in sorted(ref.items()))


def align_labels(dataset: ImageDataset, train: ImageDataset, *, name: str, train_name: str) -> ImageDataset:
    """``dataset`` (an evaluation split) labelled by class name in ``train``'s class list.

    Returns ``dataset`` itself when its class list is train's (ImageNet's 1,000 wnids, the bundled sets), so its
    cached features stay valid. ``name`` / ``train_name`` say which splits these are in the error: a class with
    images in ``dataset`` but none in ``train`` cannot be predicted by any probe, so it is refused.
    """
    own, target = list(dataset.class_names), list(train.class_names)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    train_labels = np.asarray(train.labels, dtype=np.int64)
    counts_in_train = np.bincount(train_labels[train_labels >= 0], minlength=len(target))[: len(target)]
    trained = {target[i] for i in np.flatnonzero(counts_in_train)}
    present, counts = np.unique(labels[labels >= 0], return_counts=True)  # negative: unlabelled (an OOD set)
    # A label past the class list (an HF label column without names for it) is named by its number.
    names = own + [str(i) for i in range(len(own), int(present.max()) + 1 if len(present) else 0)]
    absent = [(names[i], int(n), int(i)) for n, i in zip(counts, present) if names[i] not in trained]
    if absent:
        cls, n, index = absent[0]
        paths = getattr(dataset, "paths", None)
        folder = ""
        if paths is not None:
            first = int(np.flatnonzero(labels == index)[0])
            folder = f", folder {os.path.dirname(paths[first])!r}"
        more = f" (and {len(absent) - 1} more: {[a[0] for a in absent[1:4]]})" if len(absent) > 1 else ""
        raise DataError(
            f"Class {cls!r}{more} has {n} image(s) in split {name}{folder} but none in the training split "
            f"{train_name}; every split of a task is labelled by the training split's class names, so add training "
            f"images of {cls!r} or remove its images from that split"
        )
    if own == target:
        return dataset
    pos = {c: i for i, c in enumerate(target)}
    table = np.array([pos.get(c, -1) for c in names] or [-1], dtype=np.int64)
    mapped = labels.copy()
    keep = labels >= 0
    mapped[keep] = table[labels[keep]]
    return RelabelledImageDataset(dataset, mapped, target)
