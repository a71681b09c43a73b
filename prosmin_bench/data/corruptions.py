"""The 15 ImageNet-C corruptions, seeded, and ``digits_c``: the digits test split under them.

Corruptions come from ``imagecorruptions`` (the ``imagecorruptions-imaug`` fork, which runs on current numpy and
scikit-image): ``corrupt(image uint8 [H, W, 3], corruption_name=..., severity=1..5)``, images of at least 32 px
(Hendrycks & Dietterich, ICLR 2019). The package draws from numpy's global RNG (and, for ``glass_blur`` and
``impulse_noise``, from a ``seed`` argument that defaults to fresh entropy), so ``corrupt_image`` seeds both from
a per-image seed and restores the global RNG state afterwards: the same (image, corruption, severity, seed)
always gives the same pixels.

``digits_c`` (splits ``<corruption>/<severity>``, e.g. ``digits_c:fog/3``): the 360 digits test images under each
of the 15 corruptions x 5 severities, generated on first use and cached under ``<cache>/data/digits_c-v<N>/``
(written atomically), keyed by the generator version, the base set and the imagecorruptions version. Measured on
one core: about 20 ms per image for all 15 corruptions at one severity (glass_blur ~4 ms, frost ~7 ms after the
first call), i.e. about 40 s for the whole set, once.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

from .. import config
from ..atomic import atomic_path
from ..errors import DataError
from ..metrics import CORRUPTIONS
from .base import ArrayImageDataset, DatasetSpec, ImageDataset, register_dataset
from .bundled import load_digits_split

log = logging.getLogger(__name__)

#: Bump when the generated images change (it is part of the cache path and the dataset version).
GENERATOR_VERSION = 1
SEVERITIES = (1, 2, 3, 4, 5)
#: Base seed of the digits_c draw (fixed: digits_c is one dataset, not a per-run sample).
DIGITS_C_SEED = 0
#: Corruptions whose randomness comes from a ``seed`` argument rather than numpy's global RNG.
_SEEDED_BY_ARGUMENT = ("glass_blur", "impulse_noise")
MIN_SIZE = 32  # imagecorruptions refuses smaller images


def imagecorruptions_version() -> str:
    try:
        return metadata.version("imagecorruptions-imaug")
    except metadata.PackageNotFoundError:
        try:
            return metadata.version("imagecorruptions")
        except metadata.PackageNotFoundError:
            raise DataError(
                "The corruptions need the `imagecorruptions-imaug` package: pip install imagecorruptions-imaug"
            ) from None


def check_corruption(corruption: str, severity: int) -> None:
    if corruption not in CORRUPTIONS:
        raise DataError(f"Expected one of the 15 ImageNet-C corruptions {list(CORRUPTIONS)}, but got {corruption!r}")
    if severity not in SEVERITIES:
        raise DataError(f"Expected a corruption severity in 1..5, but got {severity!r}")


def image_seed(*parts: int | str) -> int:
    """A 32-bit seed from any parts (ints or strings), stable across processes and Python versions."""
    words: list[int] = []
    for p in parts:
        if isinstance(p, str):
            words.extend(p.encode())
            words.append(0x1F)  # separator, so ("ab", "c") != ("a", "bc")
        else:
            words.append(int(p) & 0xFFFFFFFF)
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One image uint8 [H, W, 3] (H, W >= 32) under ``corruption`` at ``severity``, deterministic in ``seed``."""
    from imagecorruptions import corrupt  # here: its import takes 0.7 s, and only corrupting an image needs it

    check_corruption(corruption, severity)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"Expected a uint8 image [H, W, 3], but got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIZE:
        raise DataError(f"imagecorruptions needs images of at least {MIN_SIZE} px, but got {image.shape[:2]}")
    kwargs = {"seed": seed} if corruption in _SEEDED_BY_ARGUMENT else {}
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = corrupt(image, corruption_name=corruption, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)  # library code must not leave numpy's global RNG changed
    if out.shape != image.shape:  # some corruptions return [H, W] for grey input; ours is RGB
        raise DataError(f"{corruption} returned shape {out.shape} for an image of shape {image.shape}")
    return np.ascontiguousarray(out, dtype=np.uint8)


def corrupt_array(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Images uint8 [N, H, W, 3] under one corruption and severity; image i uses seed (seed, c, s, i)."""
    ci = CORRUPTIONS.index(corruption) if corruption in CORRUPTIONS else -1
    out = np.empty_like(images)
    for i in range(len(images)):
        out[i] = corrupt_image(images[i], corruption, severity, image_seed(seed, ci, severity, i))
    return out


def _atomic_save(path: Path, array: np.ndarray) -> None:
    # A file object: np.save would append ".npy" to the temporary name, which ends in .tmp.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def digits_c_base() -> ArrayImageDataset:
    """The clean images digits_c corrupts: the digits test split (tests may substitute a smaller set)."""
    return load_digits_split("test")  # type: ignore[return-value]


def parse_corruption_split(split: str) -> tuple[str, int]:
    """``"fog/3"`` -> ("fog", 3), with a DataError naming the expected form otherwise."""
    name, _, sev = split.partition("/")
    try:
        severity = int(sev)
    except ValueError:
        raise DataError(
            f"Expected a corruption split '<corruption>/<severity>' (e.g. 'fog/3'), but got {split!r}"
        ) from None
    check_corruption(name, severity)
    return name, severity


def digits_c_cache_path(base_fingerprint: str, corruption: str, severity: int) -> Path:
    tag = f"digits_c-v{GENERATOR_VERSION}-ic{imagecorruptions_version()}"
    return config.data_cache_dir() / tag / base_fingerprint / f"{corruption}-{severity}.npy"


def load_digits_c(split: str, data_root: Path | None = None) -> ImageDataset:
    """``digits_c:<corruption>/<severity>``: generated on first use, then read from the cache."""
    corruption, severity = parse_corruption_split(split)
    base = digits_c_base()
    path = digits_c_cache_path(base.fingerprint, corruption, severity)
    images = None
    if path.is_file():
        try:
            images = np.load(path)
            if images.shape != base.images.shape or images.dtype != np.uint8:
                log.warning("ignoring digits_c cache %s with shape %s (expected %s)", path, images.shape,
                            base.images.shape)
                images = None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable digits_c cache %s (%s); regenerating", path, exc)
            images = None
    if images is None:
        log.info("generating digits_c %s severity %d (%d images)", corruption, severity, len(base.images))
        images = corrupt_array(base.images, corruption, severity, DIGITS_C_SEED)
        _atomic_save(path, images)
    fingerprint = (f"digits_c-v{GENERATOR_VERSION}-{base.fingerprint}-{corruption}-{severity}"
                   f"-ic{imagecorruptions_version()}")
    return ArrayImageDataset(images, base.labels, base.class_names, fingerprint)


@lru_cache(maxsize=1)
def corruption_splits() -> tuple[str, ...]:
    return tuple(f"{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES)


register_dataset(DatasetSpec(
    name="digits_c", version=str(GENERATOR_VERSION), splits=corruption_splits(), loader=load_digits_c, scale="mini",
    num_classes=10,
    source="generated from the digits test split with imagecorruptions-imaug (seeded; cached on first use)",
    layout="<cache>/data/digits_c-v1-ic<version>/<base>/<corruption>-<severity>.npy (made automatically)",
    description="the 360 digits test images under the 15 ImageNet-C corruptions x 5 severities",
))
