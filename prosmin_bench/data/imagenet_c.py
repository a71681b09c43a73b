"""ImageNet-C (Hendrycks & Dietterich, ICLR 2019): the official folder layout, and a builder for it.

Layout: ``<data_root>/imagenet-c/<corruption>/<severity 1-5>/<wnid>/*.JPEG`` (the 15 corruptions of
``metrics.CORRUPTIONS``). Splits are ``<corruption>/<severity>``, e.g. ``imagenet_c:fog/3``; labels follow the
1,000 ImageNet wnids (``_refdata/imagenet_wnids.txt``). The images are already 224 px (Resize 256 + CenterCrop 224
at generation), so the corruption task feeds them through CenterCrop + normalise only (docs/protocols.md).

``build_imagenet_c`` makes the same layout from ``<data_root>/imagenet/val/<wnid>/*.JPEG`` the way the original
generation script did (hendrycks/robustness ``ImageNet-C/create_c/make_imagenet_c.py``): Resize 256 (bilinear) +
CenterCrop 224, the corruption at each severity, saved as JPEG quality 85 with ``optimize=True`` under the source
file name. It uses the ``imagecorruptions-imaug`` re-implementation, seeded per (file, corruption, severity), so a
rebuild gives the same pixels; it is resumable (existing files are skipped, each file is written to a temporary
name and renamed) and parallel (``workers`` processes).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms as T

from .. import progress
from ..atomic import atomic_path
from ..errors import DataError
from ..metrics import CORRUPTIONS
from .base import DatasetSpec, ImageDataset, register_dataset, require_root, to_rgb
from .corruptions import (
    SEVERITIES, check_corruption, corrupt_image, corruption_splits, image_seed, parse_corruption_split,
)
from .folder import imagenet_wnids, list_image_folder
from .imagenet import IMAGENET_LAYOUT, IMAGENET_SOURCE

log = logging.getLogger(__name__)

IMAGENET_C_SOURCE = (
    "https://zenodo.org/record/2235448 (noise.tar, blur.tar, weather.tar, digital.tar; extract all four into "
    "<data-root>/imagenet-c), or build it from ImageNet val: `prosmin-bench data make-imagenet-c --data-root DIR`"
)
IMAGENET_C_LAYOUT = "<data-root>/imagenet-c/<corruption>/<severity 1-5>/<wnid>/*.JPEG (15 corruptions x 5 severities)"


def load_imagenet_c(split: str, data_root: Path | None) -> ImageDataset:
    corruption, severity = parse_corruption_split(split)
    root = require_root("imagenet_c", data_root, f"imagenet-c/{corruption}/{severity}", IMAGENET_C_LAYOUT,
                        IMAGENET_C_SOURCE)
    return list_image_folder(root, imagenet_wnids(), allow_missing_classes=True, name=f"imagenet_c:{split}")


register_dataset(DatasetSpec(
    name="imagenet_c", version="1", splits=corruption_splits(), loader=load_imagenet_c, scale="imagenet",
    num_classes=1000, source=IMAGENET_C_SOURCE, layout=IMAGENET_C_LAYOUT,
    description="ImageNet-C: ImageNet val under 15 corruptions x 5 severities, 224 px",
))


@dataclass(frozen=True)
class ImageNetCBuild:
    """What ``build_imagenet_c`` makes. Defaults reproduce the official generation (make_imagenet_c.py)."""

    data_root: Path
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    resize: int = 256  # make_imagenet_c.py: trn.Resize(256) (bilinear)
    crop: int = 224  # make_imagenet_c.py: trn.CenterCrop(224)
    jpeg_quality: int = 85  # make_imagenet_c.py: save(..., quality=85, optimize=True)
    seed: int = 0
    progress: bool | None = None  # None: the package's progress policy (prosmin_bench.progress); False: none


@dataclass
class BuildReport:
    written: int
    skipped: int
    source_images: int
    out_root: Path


def _check_build(opts: ImageNetCBuild) -> None:
    if not opts.corruptions:
        raise DataError("Expected at least one corruption to build")
    for c in opts.corruptions:
        for s in opts.severities:
            check_corruption(c, s)
    if opts.workers < 1:
        raise DataError(f"Expected --workers to be a positive integer, but got {opts.workers}")


def _jobs(opts: ImageNetCBuild, out_root: Path) -> tuple[list[tuple[str, str, list[tuple[str, int, str]]]], int, int]:
    """Per source image: (path, relative name, [(corruption, severity, destination)]) for what is missing."""
    val = require_root("imagenet", opts.data_root, "imagenet/val", IMAGENET_LAYOUT, IMAGENET_SOURCE)
    ds = list_image_folder(val, imagenet_wnids(), allow_missing_classes=True, name="imagenet:val")
    jobs = []
    skipped = 0
    for path, label in zip(ds.paths, ds.labels.tolist()):
        wnid = ds.class_names[label]
        name = os.path.basename(path)
        if not name.lower().endswith((".jpeg", ".jpg")):
            name = os.path.splitext(name)[0] + ".JPEG"
        todo = []
        for c in opts.corruptions:
            for s in opts.severities:
                dst = out_root / c / str(s) / wnid / name
                if dst.is_file():
                    skipped += 1
                else:
                    todo.append((c, s, str(dst)))
        if todo:
            jobs.append((path, f"{wnid}/{name}", todo))
    return jobs, skipped, len(ds)


def _process_image(args: tuple[str, str, list[tuple[str, int, str]], int, int, int, int]) -> int:
    """Worker: load one val image, Resize + CenterCrop, write each missing (corruption, severity) file."""
    path, rel, todo, resize, crop, quality, seed = args
    with Image.open(path) as im:
        img = to_rgb(im)
    img = _resize_center_crop(img, resize, crop)
    arr = np.asarray(img, dtype=np.uint8)
    for corruption, severity, dst in todo:
        out = corrupt_image(arr, corruption, severity, image_seed(seed, CORRUPTIONS.index(corruption), severity, rel))
        with atomic_path(dst) as tmp:  # a killed run never leaves a half-written image under the final name
            Image.fromarray(out).save(tmp, format="JPEG", quality=quality, optimize=True)
    return len(todo)


def _resize_center_crop(img, resize: int, crop: int):
    """torchvision's Resize(resize) (shorter side, bilinear) + CenterCrop(crop) on a PIL image."""
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(crop)])(img)


def build_imagenet_c(opts: ImageNetCBuild) -> BuildReport:
    """Write ``<data_root>/imagenet-c/<c>/<s>/<wnid>/<name>.JPEG`` for every val image, corruption and severity
    that is not there yet. Returns counts of written and skipped files."""
    _check_build(opts)
    out_root = Path(opts.data_root) / "imagenet-c"
    jobs, skipped, n_src = _jobs(opts, out_root)
    total = sum(len(t) for _, _, t in jobs)
    log.info("ImageNet-C: %d val images, %d files to write, %d already present (%s)", n_src, total, skipped, out_root)
    args = [(p, rel, todo, opts.resize, opts.crop, opts.jpeg_quality, opts.seed) for p, rel, todo in jobs]
    written = 0
    bar = progress.bar(total=total, desc="imagenet-c", unit="img", enabled=opts.progress)
    shown = not bar.disable  # else a log line every 5% (with --progress off and no -q)
    step = max(total // 20, 1)
    try:
        if opts.workers == 1 or len(args) <= 1:
            results = map(_process_image, args)
            for n in results:
                written += n
                bar.update(n)
                if not shown and written // step != (written - n) // step:
                    log.info("ImageNet-C: %d / %d files written", written, total)
        else:
            # spawn: workers start clean (no inherited torch threads or CUDA state)
            with multiprocessing.get_context("spawn").Pool(opts.workers) as pool:
                for n in pool.imap_unordered(_process_image, args, chunksize=4):
                    written += n
                    bar.update(n)
                    if not shown and written // step != (written - n) // step:
                        log.info("ImageNet-C: %d / %d files written", written, total)
    finally:
        bar.close()
    return BuildReport(written=written, skipped=skipped, source_images=n_src, out_root=out_root)
