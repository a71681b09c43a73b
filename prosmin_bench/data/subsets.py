"""Labelled subsets for the low-shot and semi-supervised tasks.

Two sources (docs/protocols.md "Splits 1% / 10%"):

- a SimCLR split file (``imagenet_subsets/1percent.txt`` / ``10percent.txt`` of google-research/simclr, shipped as
  ``_refdata/imagenet_{1,10}percent.txt``): one train file name per line, e.g. ``n04235860_14959.JPEG``; the wnid
  is the prefix before ``_``. Files are matched by name against the train folder.
- a stratified draw of ``round(fraction * N)`` samples (scikit-learn's stratified split), different for every
  seed and recorded in the result.

Either way, a class of the evaluation set with no labelled example is an error, never a silently easier task.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .base import ImageDataset
from .folder import read_lines, reference_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledSubset:
    """Indices [n] (sorted) into a training set, with a JSON-able description of how they were chosen."""

    indices: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.indices))


def resolve_split_file(name: str, data_root: Path | None = None) -> Path:
    """Where a split file named by a card lives: an absolute path, a path under the data root, or the name of a
    file shipped in ``prosmin_bench/_refdata`` (e.g. ``imagenet_1percent.txt``)."""
    p = Path(name).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = ([Path(data_root) / p] if data_root is not None else []) + [reference_file(name)]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(
        f"Split file {name!r} not found (looked in {[str(c) for c in candidates]}); give a path, a file under "
        "--data-root, or a shipped name such as 'imagenet_1percent.txt' (SimCLR's imagenet_subsets/1percent.txt)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def subset_from_split_file(paths: list[str], labels: np.ndarray, class_names: list[str], split_file: Path,
                           *, root: str | os.PathLike | None = None) -> LabelledSubset:
    """Select the train images a SimCLR split file names (matched by file name).

    Args:
        paths: file paths of the train set [N] (an image-folder dataset's ``paths``); labels [N]; class_names.
        split_file: one file name per line, ``<wnid>_<id>.JPEG``.
    Raises:
        DataError when a listed file is missing from a class folder that exists (an incomplete download), or when
        nothing matches. Listed files of classes absent from the folder altogether are skipped with a warning
        (the loader accepts partial layouts, e.g. tiny test trees).
    """
    names = read_lines(split_file)
    if not names:
        raise DataError(f"Split file {str(split_file)!r} is empty; expected one train file name per line")
    by_name = {os.path.basename(p): i for i, p in enumerate(paths)}
    present_classes = {class_names[c] for c in np.unique(labels)}
    chosen: list[int] = []
    missing: list[str] = []
    skipped = 0
    for n in names:
        i = by_name.get(n)
        if i is not None:
            chosen.append(i)
        elif n.split("_", 1)[0] in present_classes:
            missing.append(n)
        else:
            skipped += 1
    where = str(root) if root is not None else "the train folder"
    if missing:
        raise DataError(
            f"{len(missing)} of {len(names)} files listed in {split_file.name} are missing under {where!r} "
            f"(e.g. {missing[:3]}); the train folder is incomplete: re-extract ImageNet train into <wnid> folders"
        )
    if not chosen:
        raise DataError(f"None of the {len(names)} files listed in {split_file.name} is under {where!r}; "
                        "check --data-root and the split file")
    if skipped:
        log.warning("%d of %d files listed in %s belong to classes with no folder under %s; they are skipped",
                    skipped, len(names), split_file.name, where)
    idx = np.array(sorted(set(chosen)), dtype=np.int64)
    return LabelledSubset(idx, {
        "source": "split_file", "file": split_file.name, "sha256": _sha256(split_file), "listed": len(names),
        "skipped_absent_classes": skipped, "n_labelled": int(len(idx)),
    })


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> LabelledSubset:
    """``round(fraction * N)`` indices drawn stratified by label (scikit-learn ``train_test_split``), fixed by ``seed``.

    Raises DataError when the draw is too small to hold every class (a class with no training example).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise DataError(f"Expected a labelled fraction in (0, 1), but got {fraction!r}")
    classes = np.unique(labels)
    n = int(round(fraction * len(labels)))
    if n < len(classes):
        raise DataError(
            f"A {fraction:g} fraction of {len(labels)} images is {n} labelled examples, fewer than the "
            f"{len(classes)} classes: some class would have no training example; use a larger fraction"
        )
    idx, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    idx = np.sort(idx)
    absent = sorted(set(classes.tolist()) - set(labels[idx].tolist()))
    if absent:
        raise DataError(
            f"The stratified {fraction:g} subset (seed {seed}) has no example of class(es) {absent[:5]}; use a "
            "larger fraction"
        )
    digest = hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()[:16]
    return LabelledSubset(idx, {"source": "stratified", "fraction": fraction, "seed": seed, "n_labelled": int(n),
                                "indices_sha256": digest})


def check_covers(subset_labels: np.ndarray, needed: np.ndarray, class_names: list[str] | None, what: str) -> None:
    """DataError unless every class in ``needed`` (e.g. the test labels) has a labelled example."""
    absent = sorted(set(np.unique(needed).tolist()) - set(np.unique(subset_labels).tolist()))
    if absent:
        named = [class_names[a] if class_names and 0 <= a < len(class_names) else a for a in absent[:5]]
        raise DataError(
            f"{what}: {len(absent)} class(es) of the evaluation set have no labelled training example "
            f"(e.g. {named}); the subset or the train folder is incomplete"
        )


class SubsetImageDataset(ImageDataset):
    """The images of ``base`` at ``indices`` (e.g. a labelled subset), as an ImageDataset of its own."""

    def __init__(self, base: ImageDataset, indices: np.ndarray) -> None:
        super().__init__()
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(base.labels)[self.indices]
        self.class_names = list(base.class_names)
        self._digest = hashlib.sha256(self.indices.tobytes()).hexdigest()[:16]
        self.fingerprint = f"{base.fingerprint}|subset={self._digest}"

    def fingerprint_for(self, data_hash: str = "stat") -> str:
        return f"{self.base.fingerprint_for(data_hash)}|subset={self._digest}"

    def get_image(self, index: int):
        return self.base.get_image(int(self.indices[index]))
