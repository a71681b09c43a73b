"""Feature extraction with a content-keyed cache.

Features are computed once per (weights sha256, architecture, dataset identity + fingerprint, preprocessing,
layer, precision, dtype) and stored as ``.npy`` (memory-mappable: a 1.28M x 1536 float16 bank opens without being
read whole) with a JSON sidecar written last, so a half-written entry is never read. Tasks never see the cache:
they ask for features and get them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config
from .errors import FeatureError

log = logging.getLogger(__name__)

#: Bumped when the extraction code changes the numbers it produces (part of every cache key).
EXTRACTOR_VERSION = 1

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class FeatureSet:
    """Features [N, D] and labels [N] of one dataset under one model and layer.

    ``computed`` says whether this call ran the backbone (False on a cache hit); ``images_per_second`` is the
    extraction throughput when computed (from the cache metadata otherwise).
    """

    features: np.ndarray
    labels: np.ndarray
    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    computed: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def check_finite(features: np.ndarray | torch.Tensor, what: str = "features") -> None:
    """Refuse NaN or inf before any metric is computed (a diverged checkpoint must not yield numbers)."""
    arr = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise FeatureError(
            f"{what} contain NaN or inf in {len(rows)} of {arr.shape[0]} rows (first row {int(rows[0])}): the "
            "weights are probably diverged or corrupt; check the checkpoint (or try --precision fp32)"
        )


def cache_key(model: Any, dataset_id: str, fingerprint: str, layer: str, precision: str, dtype: str) -> str:
    spec = model.spec
    parts = {
        "extractor": EXTRACTOR_VERSION,
        "weights_sha256": model.weights_sha256,
        "arch": spec.arch,
        "arch_kwargs": spec.arch_kwargs,
        "dataset": dataset_id,
        "fingerprint": fingerprint,
        "preprocess": spec.preprocess.key(),
        "layer": layer,
        "precision": precision,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _paths(key: str, root: Path) -> tuple[Path, Path, Path]:
    d = root / key[:2]
    return d / f"{key}.npy", d / f"{key}.labels.npy", d / f"{key}.json"


def load_cached(key: str, root: Path | None = None) -> FeatureSet | None:
    """The cached FeatureSet for ``key`` (memory-mapped), or None. Entries without their JSON sidecar (an
    interrupted write) are ignored."""
    root = root or config.features_dir()
    fpath, lpath, mpath = _paths(key, root)
    if not (mpath.is_file() and fpath.is_file() and lpath.is_file()):
        return None
    try:
        meta = json.loads(mpath.read_text())
        feats = np.load(fpath, mmap_mode="r")
        labels = np.load(lpath)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable feature cache entry %s (%s); it will be recomputed", key[:12], exc)
        return None
    if feats.shape[0] != labels.shape[0] or feats.shape[0] != meta.get("n"):
        log.warning("ignoring inconsistent feature cache entry %s; it will be recomputed", key[:12])
        return None
    return FeatureSet(feats, labels, key, meta, computed=False)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store(fs: FeatureSet, root: Path | None = None) -> None:
    """Write a FeatureSet atomically: arrays first, the JSON sidecar (the commit marker) last."""
    root = root or config.features_dir()
    fpath, lpath, mpath = _paths(fs.key, root)
    _atomic_save_npy(fpath, np.ascontiguousarray(fs.features))
    _atomic_save_npy(lpath, np.asarray(fs.labels))
    fd, tmp = tempfile.mkstemp(dir=mpath.parent, prefix=mpath.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(fs.meta, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, mpath)


def _forward(model: Any, images: torch.Tensor, layer: str) -> torch.Tensor:
    if layer in ("predictive_mu", "predictive_sigma"):
        mu, sigma = model.predictive(images)
        return mu if layer == "predictive_mu" else sigma
    return model.features(images, layer)


def compute_features(
    model: Any, dataset: Any, *, layer: str = "cls", batch_size: int = 256, device: torch.device | str = "cpu",
    precision: str = "fp32", num_workers: int = 0, progress: bool | None = None, desc: str = "features",
) -> tuple[torch.Tensor, np.ndarray, float]:
    """Run the backbone over ``dataset`` (no_grad, eval mode). Returns (features [N, D] float32 on CPU, labels [N],
    images/s)."""
    if precision not in PRECISIONS:
        raise FeatureError(f"Expected precision 'fp32', 'bf16' or 'fp16', but got {precision!r}")
    device = torch.device(device)
    ds = dataset.with_transform(model.transform)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    model.eval()
    outs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    amp = PRECISIONS[precision]
    start = time.perf_counter()
    with torch.no_grad():
        for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                out = _forward(model, images, layer)
            outs.append(out.float().cpu())
            labels.append(y)
    elapsed = max(time.perf_counter() - start, 1e-9)
    feats = torch.cat(outs) if outs else torch.empty(0, model.layer_dim(layer))
    ys = torch.cat(labels).numpy() if labels else np.empty(0, dtype=np.int64)
    return feats, ys.astype(np.int64), len(ys) / elapsed


def extract(
    model: Any, dataset: Any, *, dataset_id: str, layer: str = "cls", batch_size: int = 256,
    device: torch.device | str = "cpu", precision: str = "fp32", dtype: str = "float32", cache: bool = True,
    cache_root: Path | None = None, num_workers: int = 0,
) -> FeatureSet:
    """Features of ``dataset`` under ``model`` from the cache, or computed (and cached) on a miss.

    Args:
        model: a Backbone (``.spec``, ``.weights_sha256``, ``.transform``, ``.features(images, layer)``).
        dataset: an ImageDataset (``.fingerprint``, ``.with_transform``).
        dataset_id: the dataset's name, version and split, e.g. ``digits@1:train``.
        layer: "cls", "cls_lastN", "avgpool", "predictive_mu" or "predictive_sigma".
        dtype: storage dtype of cached features ("float32" or "float16").
    """
    if dtype not in STORE_DTYPES:
        raise FeatureError(f"Expected feature dtype 'float32' or 'float16', but got {dtype!r}")
    key = cache_key(model, dataset_id, dataset.fingerprint, layer, precision, dtype)
    if cache:
        hit = load_cached(key, cache_root)
        if hit is not None:
            log.debug("feature cache hit %s (%s, %s)", key[:12], model.spec.name, dataset_id)
            return hit
    log.info("extracting %s features of %s on %s (%d images)", layer, model.spec.name, dataset_id, len(dataset))
    feats, labels, ips = compute_features(
        model, dataset, layer=layer, batch_size=batch_size, device=device, precision=precision,
        num_workers=num_workers, desc=f"{model.spec.name} {dataset_id}",
    )
    check_finite(feats, f"{model.spec.name} features of {dataset_id}")
    arr = feats.numpy().astype(STORE_DTYPES[dtype])
    meta = {
        "n": int(arr.shape[0]), "dim": int(arr.shape[1]), "model": model.spec.name,
        "weights_sha256": model.weights_sha256, "dataset": dataset_id, "layer": layer, "precision": precision,
        "dtype": dtype, "images_per_second": ips, "device": str(device), "created": time.time(),
    }
    fs = FeatureSet(arr, labels, key, meta, computed=True)
    if cache:
        store(fs, cache_root)
    return fs
