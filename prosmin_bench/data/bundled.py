"""Mini data that ships inside installed packages (offline, embedded).

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, values 0-16, bright ink on a dark ground), upsampled
  bilinearly to 32x32 and repeated to RGB; fixed stratified 80/20 split (seed 0): 1,437 train / 360 test.
- ``digits_o``: natural non-digit images from scikit-image in the digits format (32x32 grey -> RGB): the 200
  ``lfw_subset`` images (faces and non-faces) and 160 random crops (seed 0) of eight bundled photographs.
  One split, ``test``: it is only ever an OOD set.
- ``lfw``: scikit-image's ``lfw_subset`` (100 faces, 100 non-faces, 25x25) at 32x32 RGB; stratified 80/20 split
  (seed 0). The mini transfer target.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .base import ArrayImageDataset, DatasetSpec, ImageDataset, register_dataset

SIZE = 32  # mini-scale image side: the smallest size the ImageNet-C corruptions accept (imagecorruptions-imaug)
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def _to_rgb32(gray01: np.ndarray) -> np.ndarray:
    """[H, W] floats in [0, 1] -> uint8 [32, 32, 3] (bilinear resize, grey repeated to RGB)."""
    im = Image.fromarray(np.clip(gray01 * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    im = im.resize((SIZE, SIZE), Image.BILINEAR)
    return np.repeat(np.asarray(im)[:, :, None], 3, axis=2)


def _split(labels: np.ndarray, split: str) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return np.sort(train if split == "train" else test)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.stack([_to_rgb32(img / 16.0) for img in d.images])
    return images, d.target.astype(np.int64)


def load_digits_split(split: str, data_root: Path | None = None) -> ImageDataset:
    images, labels = _digits_arrays()
    idx = _split(labels, split)
    return ArrayImageDataset(images[idx], labels[idx], [str(i) for i in range(10)], f"digits-v1-{split}")


# Bundled photographs cropped for digits_o (all ship inside scikit-image; none contains digits or text).
_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "clock")
_CROPS_PER_PHOTO = 20


@lru_cache(maxsize=1)
def _digits_o_arrays() -> np.ndarray:
    import skimage.data
    from skimage.color import rgb2gray

    faces = skimage.data.lfw_subset()  # [200, 25, 25] floats in [0, 1]
    out = [_to_rgb32(f) for f in faces]
    rng = np.random.default_rng(SPLIT_SEED)
    for name in _PHOTOS:
        img = getattr(skimage.data, name)()
        gray = rgb2gray(img) if img.ndim == 3 else img / 255.0
        h, w = gray.shape
        for _ in range(_CROPS_PER_PHOTO):
            side = int(rng.integers(48, min(h, w, 160) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = gray[y : y + side, x : x + side]
            lo, hi = float(crop.min()), float(crop.max())
            out.append(_to_rgb32((crop - lo) / (hi - lo + 1e-8)))  # contrast-stretch like the digits' 0-16 range
    return np.stack(out)


def load_digits_o(split: str, data_root: Path | None = None) -> ImageDataset:
    images = _digits_o_arrays()
    # Labels are meaningless for an OOD set; -1 marks "no ID class".
    return ArrayImageDataset(images, np.full(len(images), -1), ["ood"], "digits_o-v1")


@lru_cache(maxsize=1)
def _lfw_arrays() -> tuple[np.ndarray, np.ndarray]:
    import skimage.data

    faces = skimage.data.lfw_subset()
    if len(faces) != 200:
        raise DataError(f"Expected scikit-image's lfw_subset to hold 200 images, but it holds {len(faces)}")
    labels = np.array([1] * 100 + [0] * 100, dtype=np.int64)  # first 100 are faces (skimage docs)
    return np.stack([_to_rgb32(f) for f in faces]), labels


def load_lfw_split(split: str, data_root: Path | None = None) -> ImageDataset:
    images, labels = _lfw_arrays()
    idx = _split(labels, split)
    return ArrayImageDataset(images[idx], labels[idx], ["non-face", "face"], f"lfw-v1-{split}")


register_dataset(DatasetSpec(
    name="digits", version="1", splits=("train", "test"), loader=load_digits_split, scale="mini", num_classes=10,
    source="bundled with scikit-learn (sklearn.datasets.load_digits)",
    description="1,797 handwritten digits at 32x32 RGB, stratified 80/20 split (seed 0)",
))
register_dataset(DatasetSpec(
    name="digits_o", version="1", splits=("test",), loader=load_digits_o, scale="mini",
    source="bundled with scikit-image (skimage.data.lfw_subset and photographs)",
    description="360 natural non-digit images in the digits format (OOD for digits)",
))
register_dataset(DatasetSpec(
    name="lfw", version="1", splits=("train", "test"), loader=load_lfw_split, scale="mini", num_classes=2,
    source="bundled with scikit-image (skimage.data.lfw_subset)",
    description="200 faces / non-faces at 32x32 RGB, stratified 80/20 split (seed 0)",
))
