"""Local image folders: the class-per-subfolder layout and ImageNet's train/val layout.

Class order is the sorted subfolder names (torchvision ImageFolder's convention), or a fixed class list (ImageNet:
the 1,000 wnids in index order, shipped as reference data) so label indices match across folders and subsets. A
task labels its other splits by class name in its training split's list (``data.labels``), so a test folder that
lacks a class shifts nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..errors import DataError
from .base import FileImageDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def reference_file(name: str) -> Path:
    """A reference data file shipped in ``prosmin_bench/_refdata`` (wnid lists, SimCLR splits, AlexNet errors)."""
    return Path(str(resources.files("prosmin_bench").joinpath("_refdata", name)))


def read_lines(path: str | os.PathLike) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k wnids in class-index order."""
    return read_lines(reference_file("imagenet_wnids.txt"))


def list_image_folder(
    root: str | os.PathLike, classes: Sequence[str] | None = None, *, allow_missing_classes: bool = False,
    name: str = "image folder",
) -> FileImageDataset:
    """Scan ``root/<class>/<image>``. With ``classes``, labels follow that order and other folders are ignored.

    Raises DataError when the root is missing, has no class folders, has no images, or (without ``classes``) has a
    class folder without images, saying what was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{name}: folder {str(root)!r} does not exist; expected {root}/<class>/<image files>")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    discovered = classes is None
    if classes is None:
        classes = found
        if not classes:
            loose = [e.name for e in os.scandir(root) if e.is_file()][:3]
            raise DataError(
                f"{name}: {str(root)!r} has no class subfolders (found files {loose} at its top); expected "
                f"{root}/<class>/<image files>"
            )
    else:
        missing = [c for c in classes if c not in set(found)]
        if missing and (not allow_missing_classes or len(missing) == len(classes)):
            loose = sorted(e.name for e in os.scandir(root) if e.is_file())
            files = f" and {len(loose)} files (e.g. {loose[:3]})" if loose else ""
            raise DataError(
                f"{name}: {len(missing)} of {len(classes)} class folders are missing under {str(root)!r} "
                f"(e.g. {missing[:3]}); found {len(found)} folders (e.g. {found[:3]}){files}"
            )
    paths: list[str] = []
    labels: list[int] = []
    empty: list[Path] = []
    for idx, cls in enumerate(classes):
        d = root / cls
        if not d.is_dir():
            continue
        before = len(paths)
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(e.path)
                labels.append(idx)
        if len(paths) == before:
            empty.append(d)
    if not paths:
        raise DataError(
            f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}/<class>/; "
            "check the path and the layout"
        )
    if empty and discovered:
        # A class found as a folder is a class of the task: with no images it can be neither learned nor scored
        # (a probe would get an output no example trains). A fixed class list (ImageNet's) may lack images of some.
        more = f" (and {len(empty) - 1} more empty class folders)" if len(empty) > 1 else ""
        raise DataError(
            f"{name}: class folder {str(empty[0])!r}{more} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "add its images or remove the folder"
        )
    return FileImageDataset(paths, labels, list(classes), root=root)
