"""Feature extraction with a content-keyed cache, on one process or sharded over a ``torchrun`` job.

Features are computed once per (weights sha256, architecture, dataset identity + fingerprint, preprocessing,
layer, precision, stored dtype) and stored as memory-mappable ``.npy`` files with a checksummed JSON sidecar
(:mod:`prosmin_bench.feature_cache`: the entry format, its atomic writer and the checks every load makes).

Under ``torchrun`` every rank runs the backbone on its :func:`prosmin_bench.distributed.shard_indices` shard, the
shards are all-gathered back into sample order (in rounds of bounded size), and rank 0 alone writes the cache.
Tasks never see any of this: they ask for features and get them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config, distributed, progress
from .data.base import DATA_HASHES
from .errors import FeatureError, ProsminBenchError
from .feature_cache import CacheWriter, load_entry, store_entry
from .settings import PRECISIONS, STORE_DTYPES

log = logging.getLogger(__name__)

#: Bumped when the extraction code changes the numbers it produces (part of every cache key).
#: 2: 16-bit grey images are scaled to 8 bits (data.base.to_rgb); version 1 read them clipped to white.
EXTRACTOR_VERSION = 2

#: Most loader workers per process: DINO's eval_knn.py / eval_linear.py default (``--num_workers 10``).
MAX_LOADER_WORKERS = 10


@dataclass
class FeatureSet:
    """Features [N, D] and labels [N] of one dataset under one model and layer.

    ``computed`` says whether this call ran the backbone (False on a cache hit); ``meta["images_per_second"]`` is
    the extraction throughput of the run that computed them (all ranks together under torchrun).
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


def default_num_workers() -> int:
    """Data-loader workers for this process, sized from the machine: the CPUs this process may run on, shared
    by the processes torchrun started on this node (``LOCAL_WORLD_SIZE``), one kept for the process itself, at
    most :data:`MAX_LOADER_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(MAX_LOADER_WORKERS, per_process - 1))


def check_finite(features: np.ndarray | torch.Tensor, what: str = "features", row_offset: int = 0) -> None:
    """Refuse NaN or inf before any metric is computed (a diverged checkpoint must not yield numbers)."""
    arr = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise FeatureError(
            f"{what} contain NaN or inf in {len(rows)} rows (first row {int(rows[0]) + row_offset}): the "
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
    # Which network of a pretraining checkpoint the backbone is (models.converters.pretrain_eval_network): the
    # weights file is the same either way. Every cache entry written before MoCo-v3 (then ProSMin, issue 19)
    # checkpoints were evaluated with their online network came from the target network, so only another network
    # enters the key: those stay valid for the target (prosmin_target_micro), and online features never mix with them.
    if model.network not in (None, "target"):
        parts["network"] = model.network
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load_cached(key: str, root: Path | None = None) -> FeatureSet | None:
    """The cached FeatureSet for ``key`` (features memory-mapped), or None when there is no usable entry (see
    :func:`prosmin_bench.feature_cache.load_entry`: damaged or half-written entries are ignored)."""
    entry = load_entry(key, root or config.features_dir())
    if entry is None:
        return None
    feats, labels, meta = entry
    return FeatureSet(feats, labels, key, meta, computed=False)


def store(fs: FeatureSet, root: Path | None = None) -> None:
    """Write a FeatureSet to the cache atomically: arrays first, the JSON sidecar (the commit marker) last."""
    store_entry(fs.key, fs.features, fs.labels, fs.meta, root or config.features_dir())


def _forward(model: Any, images: torch.Tensor, layer: str) -> torch.Tensor:
    """images [N, 3, H, W] -> [N, D] in ``layer``: a backbone layer, ``predictive_mu`` / ``predictive_sigma`` (the
    online predictive distribution) or ``projector`` (the evaluated network's backbone -> its projection head)."""
    if layer in ("predictive_mu", "predictive_sigma"):
        mu, sigma = model.predictive(images)
        return mu if layer == "predictive_mu" else sigma
    if layer == "projector":
        return model.projector(images)
    return model.features(images, layer)


def array_batches(dataset: Any, transform: Any, batch_size: int,
                  indices: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
    """Batches (images [B, 3, H, W] float32, labels [B]) of an in-memory uint8 dataset (the mini data) made by
    tensor ops on the whole batch, or None when ``transform`` is not the plain eval transform they reproduce.

    The eval transform of 32-px models is CenterCrop(32) + ToTensor + Normalize on 32-px images: the crop keeps
    the image, ToTensor is ``uint8 / 255`` in float32 and Normalize ``(x - mean) / std``, each elementwise, so
    doing them on a batch gives the same bits as image by image (tests/test_features.py checks equality) at a
    fraction of the cost: per-image PIL conversion and transform calls took as long as the micro ViT's forward.
    """
    from torchvision import transforms as T

    from .data.base import ArrayImageDataset

    if not isinstance(dataset, ArrayImageDataset) or not isinstance(transform, T.Compose):
        return None
    if type(dataset).get_image is not ArrayImageDataset.get_image or type(dataset).__getitem__ is not \
            ArrayImageDataset.__getitem__:
        return None  # a subclass that reads its images its own way (or fails on some) is served image by image
    ops = transform.transforms
    if [type(op) for op in ops] != [T.CenterCrop, T.ToTensor, T.Normalize] or ops[2].inplace:
        return None
    if tuple(ops[0].size) != tuple(dataset.images.shape[1:3]):
        return None  # a crop that cuts the image: leave it to torchvision
    mean = torch.as_tensor(ops[2].mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(ops[2].std, dtype=torch.float32).view(1, 3, 1, 1)
    order = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            # Contiguous NCHW as torchvision's per-image ToTensor gives: a channels-last view takes other conv
            # kernels, whose fp16 rounding differs (bits differed on an AMD EPYC CPU; fp32 and bf16 did not).
            x = torch.from_numpy(dataset.images[idx]).permute(0, 3, 1, 2).to(torch.float32,
                                                                        memory_format=torch.contiguous_format).div(255)
            yield x.sub(mean).div(std), torch.from_numpy(dataset.labels[idx])

    return batches()


def _ram_array(shape: tuple[int, int], dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def compute_features(
    model: Any, dataset: Any, *, layer: str = "cls", batch_size: int = 256, device: torch.device | str = "cpu",
    precision: str = "fp32", num_workers: int = 0, desc: str = "features",
    dtype: str = "float32", indices: Sequence[int] | None = None,
    allocate: Callable[[tuple[int, int], Any], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Run the backbone over ``dataset`` (or its samples ``indices``, in that order): no_grad, eval mode,
    autocast at ``precision``.

    A bar over the batches follows the package's progress policy (:mod:`prosmin_bench.progress`), titled ``desc``.

    Args:
        dtype: storage dtype of the returned features ("float32" or "float16"); each batch is cast and
            checked for NaN/inf (float16 overflow included) as it arrives.
        allocate: ``allocate((n, D), dtype) -> array`` to fill (e.g. a memmap); default an in-RAM array.
    Returns:
        (features [n, D] in ``dtype``, labels [n] int64, images/s including data loading).
    """
    if precision not in PRECISIONS:
        raise FeatureError(f"Expected precision 'fp32', 'bf16' or 'fp16', but got {precision!r}")
    if dtype not in STORE_DTYPES:
        raise FeatureError(f"Expected feature dtype 'float32' or 'float16', but got {dtype!r}")
    device = torch.device(device)
    store_dtype = STORE_DTYPES[dtype]
    allocate = allocate or _ram_array
    n = len(dataset) if indices is None else len(indices)
    loader: Any = array_batches(dataset, model.transform, batch_size, indices)
    if loader is None:
        ds = dataset.with_transform(model.transform)
        if indices is not None:
            ds = torch.utils.data.Subset(ds, indices)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            pin_memory=device.type == "cuda", persistent_workers=False,
        )
    model.eval()
    out: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    pos = 0
    amp = PRECISIONS[precision]
    start = time.perf_counter()
    with torch.no_grad():
        for images, y in progress.bar(loader, desc=desc, total=-(-n // batch_size), unit="batch"):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                batch = _forward(model, images, layer).float().cpu().numpy()
            check_finite(batch, desc, row_offset=pos)
            with np.errstate(over="ignore"):  # overflow is checked just below, with a message that says what to do
                stored = batch.astype(store_dtype, copy=False)
            if stored is not batch and not np.isfinite(stored).all():
                raise FeatureError(
                    f"{desc} overflow {dtype} (largest |value| {float(np.abs(batch).max()):.4g}); store them as float32"
                )
            if out is None:
                out = allocate((n, batch.shape[1]), store_dtype)
            out[pos : pos + len(batch)] = stored
            labels[pos : pos + len(batch)] = y.numpy()
            pos += len(batch)
    elapsed = max(time.perf_counter() - start, 1e-9)
    if out is None:  # empty dataset or shard: the width is whatever the model gives, when it can say
        out = np.empty((0, _known_dim(model, layer)), dtype=store_dtype)
    return out, labels, n / elapsed


def _known_dim(model: Any, layer: str) -> int:
    """Feature width of ``layer`` when the model can tell without a forward pass, else 0 (e.g. the predictive
    layers; an empty shard's width then comes from the ranks that have data)."""
    try:
        return int(model.layer_dim(layer))
    except ProsminBenchError:
        return 0


def _failed_on(rank: int, message: str) -> FeatureError:
    """The error every other rank raises when extraction failed on ``rank`` (``distributed.on_every_rank``)."""
    return FeatureError(f"Feature extraction failed on rank {rank} ({message}); fix that and run again")


def extract(
    model: Any, dataset: Any, *, dataset_id: str, layer: str = "cls", batch_size: int = 256,
    device: torch.device | str = "cpu", precision: str = "fp32", dtype: str = "float32", cache: bool = True,
    cache_root: Path | None = None, num_workers: int = 0, shard: bool = False, data_hash: str = "stat",
    recompute: bool = False,
) -> FeatureSet:
    """Features of ``dataset`` under ``model`` from the cache, or computed (and cached) on a miss.

    With ``shard=True`` under ``torchrun`` (an initialised process group of several ranks), every rank must call
    this with the same arguments: each computes its :func:`~prosmin_bench.distributed.shard_indices` shard, the
    shards are all-gathered into sample order (every rank returns all N rows), and only rank 0 writes the cache,
    which is used only when every rank finds the entry. Otherwise this process extracts everything by itself
    (what a protocol running on rank 0 alone must do).

    Args:
        model: a Backbone (``.spec``, ``.weights_sha256``, ``.network``, ``.transform``, ``.features(images, layer)``).
        dataset: an ImageDataset (``.fingerprint``, ``.with_transform``).
        dataset_id: the dataset's name, version and split, e.g. ``digits@1:train``.
        layer: "cls", "cls_lastN", "avgpool", "predictive_mu", "predictive_sigma" or "projector".
        precision: autocast during the forward pass ("fp32", "bf16" or "fp16").
        dtype: storage dtype of the features ("float32" or "float16"), recorded in ``meta["dtype"]``.
        shard: split the work over the ranks of the process group (a collective call; see above).
        data_hash: how image files enter the key: "stat" (path, size, mtime) or "content" (sha256 of the bytes).
        recompute: ignore an existing entry and write a new one in its place (``--overwrite``).
    Returns:
        FeatureSet with features [N, D] (a read-only memmap when cached), labels [N] int64.
    """
    if dtype not in STORE_DTYPES:
        raise FeatureError(f"Expected feature dtype 'float32' or 'float16', but got {dtype!r}")
    if precision not in PRECISIONS:
        raise FeatureError(f"Expected precision 'fp32', 'bf16' or 'fp16', but got {precision!r}")
    if data_hash not in DATA_HASHES:
        raise FeatureError(f"Expected data hash 'stat' or 'content', but got {data_hash!r}")
    n = len(dataset)
    if n == 0:
        raise FeatureError(f"Dataset {dataset_id} has no samples; check its folder or split")
    root = cache_root or config.features_dir()
    fingerprint = dataset.fingerprint_for(data_hash)
    key = cache_key(model, dataset_id, fingerprint, layer, precision, dtype)
    world = distributed.world_size() if shard else 1
    if cache and recompute:
        log.info("recomputing feature cache entry %s (%s, %s): --overwrite", key[:12], model.spec.name, dataset_id)
    if cache and not recompute:
        hit = load_cached(key, root)
        # Every rank extracts or none does: a rank that skips would leave the others alone in the all-gather.
        if world > 1 and not all(distributed.all_gather_object(hit is not None)):
            hit = None
        if hit is not None:
            log.debug("feature cache hit %s (%s, %s)", key[:12], model.spec.name, dataset_id)
            return hit
    device = torch.device(device)
    writer = CacheWriter(key, root) if cache and (world == 1 or distributed.is_main()) else None
    allocate = writer.allocate if writer is not None else _ram_array
    desc = f"{model.spec.name} {dataset_id}"
    log.info("extracting %s features of %s on %s (%d images, %d process%s)", layer, model.spec.name, dataset_id,
             n, world, "es" if world > 1 else "")
    kwargs = dict(layer=layer, batch_size=batch_size, device=device, precision=precision, num_workers=num_workers,
                  desc=desc, dtype=dtype)
    start = time.perf_counter()
    try:
        if world == 1:
            feats, labels, _ = compute_features(model, dataset, allocate=allocate, **kwargs)
        else:
            shard = distributed.shard_indices(n)
            local, local_labels, _ = distributed.on_every_rank(
                lambda: compute_features(model, dataset, indices=shard, **kwargs), elsewhere=_failed_on)
            feats = distributed.gather_rows(local, n, allocate, device)
            labels = distributed.gather_rows(local_labels, n, _ram_array, device)
            del local, local_labels
        elapsed = max(time.perf_counter() - start, 1e-9)
        meta = {
            "n": n, "dim": int(feats.shape[1]), "model": model.spec.name, "weights_sha256": model.weights_sha256,
            "dataset": dataset_id, "layer": layer, "precision": precision, "dtype": dtype,
            "images_per_second": n / elapsed, "extraction_seconds": elapsed, "world_size": world,
            "batch_size": batch_size, "num_workers": num_workers, "device": str(device), "created": time.time(),
            "fingerprint": fingerprint, "data_hash": data_hash,
        }
        if world > 1:  # every rank leaves only once the entry is committed (or failed), so a next call agrees
            feats, meta = distributed.on_every_rank(
                lambda: writer.commit(labels, meta) if writer is not None else (feats, meta), elsewhere=_failed_on)
        elif writer is not None:
            feats, meta = writer.commit(labels, meta)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    log.info("%s: %d images in %.1f s (%.1f images/s)", desc, n, elapsed, n / elapsed)
    return FeatureSet(feats, labels, key, meta, computed=True)
