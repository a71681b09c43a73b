"""Feature extraction with a content-keyed cache, on one process or sharded over a ``torchrun`` job.

Features are computed once per (weights sha256, architecture, dataset identity + fingerprint, preprocessing,
layer, precision, stored dtype) and stored as ``.npy`` files: memory-mappable, so a 1.28M x 1536 float16 bank
opens without being read whole. A new entry is written under a temporary name and renamed into place, arrays
first and the JSON sidecar (the commit marker) last, so a half-written entry is never read. The sidecar holds a
checksum of both arrays, verified on every load: an entry edited or damaged since it was written is recomputed.

Under ``torchrun`` every rank runs the backbone on its :func:`prosmin_bench.distributed.shard_indices` shard, the
shards are all-gathered back into sample order (in rounds of bounded size), and rank 0 alone writes the cache.
Tasks never see any of this: they ask for features and get them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config, distributed
from .data.base import DATA_HASHES
from .errors import FeatureError, ProsminBenchError

log = logging.getLogger(__name__)

#: Bumped when the extraction code changes the numbers it produces (part of every cache key).
#: 2: 16-bit grey images are scaled to 8 bits (data.base.to_rgb); version 1 read them clipped to white.
EXTRACTOR_VERSION = 2

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}

#: Bytes each rank contributes to one all-gather round: the gather buffers stay at world x 64 MiB whatever the
#: dataset size (a 1.28M x 1536 float16 bank is 3.9 GB; gathering it in one call would need that per rank twice).
GATHER_ROUND_BYTES = 64 << 20

#: Most loader workers per process: DINO's eval_knn.py / eval_linear.py default (``--num_workers 10``).
MAX_LOADER_WORKERS = 10

#: Bytes of features checksummed (and, when written, checked for NaN / inf) per step.
SCAN_CHUNK_BYTES = 16 << 20


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
    # weights file is the same either way. Every cache entry written before MoCo-v3 checkpoints were evaluated with
    # their base encoder came from the target network, so only another network enters the key: those stay valid.
    if model.network not in (None, "target"):
        parts["network"] = model.network
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _paths(key: str, root: Path) -> tuple[Path, Path, Path]:
    d = root / key[:2]
    return d / f"{key}.npy", d / f"{key}.labels.npy", d / f"{key}.json"


def load_cached(key: str, root: Path | None = None) -> FeatureSet | None:
    """The cached FeatureSet for ``key`` (features memory-mapped), or None when there is no usable entry.

    Entries without their JSON sidecar (an interrupted write), unreadable, or whose arrays no longer match the
    checksums in the sidecar (edited or damaged since) are ignored with a warning, so they are recomputed. An
    intact entry holding NaN or inf (counted when it was written: the checksum says the bytes are those) raises a
    FeatureError naming its files.
    """
    root = root or config.features_dir()
    fpath, lpath, mpath = _paths(key, root)
    if not (mpath.is_file() and fpath.is_file() and lpath.is_file()):
        return None
    try:
        meta = json.loads(mpath.read_text())
        feats = np.load(fpath, mmap_mode="r")
        labels = np.load(lpath)
    except (OSError, ValueError, EOFError, json.JSONDecodeError) as exc:  # EOFError: an empty / cut-off .npy
        log.warning("ignoring unreadable feature cache entry %s (%s); it will be recomputed", key[:12], exc)
        return None
    if (feats.ndim != 2 or feats.shape[0] != labels.shape[0] or feats.shape[0] != meta.get("n")
            or feats.shape[1] != meta.get("dim") or feats.dtype.name != meta.get("dtype")):
        log.warning("ignoring inconsistent feature cache entry %s; it will be recomputed", key[:12])
        return None
    if not {"features_crc32", "labels_sha256", "nonfinite_rows"} <= set(meta):
        log.warning("ignoring feature cache entry %s: it has no checksum (written by an older version); it will "
                    "be recomputed", key[:12])
        return None
    crc = _scan(feats, finite=False)[0]
    damaged = [name for name, ok in (("labels", _labels_sha256(labels) == meta["labels_sha256"]),
                                     ("features", crc == meta["features_crc32"])) if not ok]
    if damaged:
        log.warning("feature cache entry %s (%s) does not match its checksum: its %s changed since it was written; "
                    "it will be recomputed", key[:12], fpath, " and ".join(damaged))
        return None
    if meta["nonfinite_rows"]:
        raise FeatureError(
            f"Cached features {str(fpath)!r} ({meta.get('model')} {meta.get('dataset')}) contain NaN or inf in "
            f"{meta['nonfinite_rows']} rows (first row {meta.get('first_nonfinite_row')}); delete {str(fpath.parent / key)}.* or run again with "
            "--overwrite to recompute them"
        )
    return FeatureSet(feats, labels, key, meta, computed=False)


def _labels_sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).data).hexdigest()


def _scan(features: np.ndarray, finite: bool = True) -> tuple[int, int, int]:
    """(CRC-32 of the raw feature bytes, rows holding NaN or inf, first such row or -1; both 0 / -1 unless
    ``finite``), in one pass over chunks of :data:`SCAN_CHUNK_BYTES` so a memory-mapped bank is never read whole.

    CRC-32, not sha256: it is there to catch edits and damage, not an adversary, and costs a third (measured on
    two idle shared cores: CRC-32 0.32 s/GiB, sha256 0.89 s/GiB; the NaN / inf check 0.16 s/GiB for float32 and
    0.30 s/GiB for float16, which is why loads skip it and trust the count taken when the entry was written).
    """
    rows = max(SCAN_CHUNK_BYTES // max(features.shape[1] * features.itemsize, 1), 1)
    crc, bad_rows, first_bad = 0, 0, -1
    for start in range(0, features.shape[0], rows):
        block = np.ascontiguousarray(features[start : start + rows])
        crc = zlib.crc32(block.data, crc)
        if finite and not _all_finite(block):
            bad = np.nonzero(~np.isfinite(block).all(axis=1))[0]
            bad_rows += len(bad)
            first_bad = int(bad[0]) + start if first_bad < 0 else first_bad
    return crc, bad_rows, first_bad


def _all_finite(block: np.ndarray) -> bool:
    if block.dtype == np.float16:  # exponent bits all set = inf or NaN: 3x faster than np.isfinite on float16
        return not bool(((block.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(block).all())


def _checksums(features: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """What the JSON sidecar records so :func:`load_cached` can tell an intact entry from an edited one."""
    crc, bad_rows, first_bad = _scan(features)
    return {"features_crc32": crc, "labels_sha256": _labels_sha256(labels), "nonfinite_rows": bad_rows,
            "first_nonfinite_row": first_bad}


def _temp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named before it exists, so Ctrl-C or SIGTERM (an exception between any two bytecodes, also inside
    # tempfile.mkstemp after it made the file) cannot leave a file that nobody knows to remove.
    tmp = path.with_name(f"{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise  # another writer's file (a 48-bit name collision): not ours to remove
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path without that suffix
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def store(fs: FeatureSet, root: Path | None = None) -> None:
    """Write a FeatureSet atomically: arrays first, the JSON sidecar (the commit marker) last."""
    root = root or config.features_dir()
    fpath, lpath, mpath = _paths(fs.key, root)
    features, labels = np.ascontiguousarray(fs.features), np.asarray(fs.labels, dtype=np.int64)
    mpath.unlink(missing_ok=True)  # an entry being replaced stops being one before its arrays change
    _atomic_save_npy(fpath, features)
    _atomic_save_npy(lpath, labels)
    _atomic_write_json(mpath, {"n": len(labels), "dim": int(features.shape[1]), "dtype": features.dtype.name,
                               **fs.meta, **_checksums(features, labels)})


class _CacheWriter:
    """A cache entry being written: features go straight into a temporary ``.npy`` memmap (no in-RAM copy of a
    large bank), renamed into place by :meth:`commit`; :meth:`discard` removes it after a failure."""

    def __init__(self, key: str, root: Path) -> None:
        self.key, self.root = key, root
        self.fpath, self.lpath, self.mpath = _paths(key, root)
        self.tmp: Path | None = None
        self.array: np.memmap | None = None
        self.needed = 0  # bytes the whole entry takes on disk, known once the features are allocated

    def allocate(self, shape: tuple[int, int], dtype: Any) -> np.ndarray:
        """The temporary memmap, its blocks reserved on disk: a sparse file would let a full disk surface as a
        SIGBUS ("Bus error") in the middle of the extraction instead of as an error here."""
        n_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.needed = needed = n_bytes + shape[0] * 8 + (64 << 10)  # + labels, .npy headers, JSON sidecar
        self.fpath.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.fpath.parent).free
        if free < needed:
            raise self._no_space(needed, free)
        try:
            self.tmp = _temp_path(self.fpath)
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
            fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS: the free-space check above stands
            if fallocate is not None:
                with open(self.tmp, "r+b") as f:
                    try:
                        fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                            raise
        except OSError as exc:
            self.discard()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._no_space(needed, shutil.disk_usage(self.fpath.parent).free) from None
            raise
        except BaseException:
            self.discard()
            raise
        return self.array

    def _no_space(self, needed: int, free: int) -> FeatureError:
        return FeatureError(
            f"Feature cache entry {self.key[:12]} needs {_size(needed)} free in {str(self.root)!r}, but only "
            f"{_size(free)} is free there; free space or set PROSMIN_BENCH_HOME to a folder on a larger disk (the "
            "feature cache is $PROSMIN_BENCH_HOME/features)"
        )

    def commit(self, labels: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Rename the features into place, write the labels, then the sidecar with both checksums; returns the
        committed features (a read-only memmap) and the sidecar's content."""
        if self.array is None or self.tmp is None:
            raise FeatureError("Internal error: a feature cache entry was committed before it was written")
        self.array.flush()
        meta = {**meta, **_checksums(self.array, labels)}
        self.array = None  # unmap before the rename
        try:
            self.mpath.unlink(missing_ok=True)  # an entry being replaced stops being one before its arrays change
            os.replace(self.tmp, self.fpath)
            self.tmp = None
            _atomic_save_npy(self.lpath, labels)
            _atomic_write_json(self.mpath, meta)
        except BaseException as exc:
            # Without its sidecar the entry is not one: remove its arrays too, so a full disk is not kept full.
            self.discard()
            self.fpath.unlink(missing_ok=True)
            self.lpath.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._no_space(self.needed, shutil.disk_usage(self.root).free) from None
            raise
        return np.load(self.fpath, mmap_mode="r"), meta

    def discard(self) -> None:
        self.array = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def _forward(model: Any, images: torch.Tensor, layer: str) -> torch.Tensor:
    """images [N, 3, H, W] -> [N, D] in ``layer``: a backbone layer, ``predictive_mu`` / ``predictive_sigma`` (the
    online predictive distribution) or ``projector`` (target backbone -> target projection head)."""
    if layer in ("predictive_mu", "predictive_sigma"):
        mu, sigma = model.predictive(images)
        return mu if layer == "predictive_mu" else sigma
    if layer == "projector":
        return model.projector(images)
    return model.features(images, layer)


def _ram_array(shape: tuple[int, int], dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def compute_features(
    model: Any, dataset: Any, *, layer: str = "cls", batch_size: int = 256, device: torch.device | str = "cpu",
    precision: str = "fp32", num_workers: int = 0, progress: bool | None = None, desc: str = "features",
    dtype: str = "float32", indices: Sequence[int] | None = None,
    allocate: Callable[[tuple[int, int], Any], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Run the backbone over ``dataset`` (or its samples ``indices``, in that order): no_grad, eval mode,
    autocast at ``precision``.

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
    ds = dataset.with_transform(model.transform)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, indices)
    n = len(ds)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    if progress is None:
        progress = sys.stderr.isatty() and distributed.is_main()
    from tqdm.auto import tqdm

    model.eval()
    out: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    pos = 0
    amp = PRECISIONS[precision]
    start = time.perf_counter()
    with torch.no_grad():
        for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
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


def _on_every_rank(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raised anywhere, raise everywhere (a rank failing alone would leave the
    others waiting in the all-gather until the process-group timeout)."""
    try:
        result, err = fn(), None
    except Exception as exc:  # re-raised below, on this rank as itself and on the others as a FeatureError
        result, err = None, exc
    message = str(err).splitlines()[0] if err is not None and str(err) else ""
    reports = distributed.all_gather_object(None if err is None else f"{type(err).__name__}: {message}")
    if err is not None:
        raise err
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise FeatureError(f"Feature extraction failed on rank {r} ({msg}); fix that and run again")
    return result


def _gather_rows(local: np.ndarray, n: int, allocate: Callable[[tuple[int, ...], Any], np.ndarray],
                 comm_device: torch.device) -> np.ndarray:
    """Every rank's ``shard_indices(n)`` rows [n_rank, ...] -> all n rows in sample order, on every rank.

    Rows travel as raw bytes (exact for any dtype, and every backend can gather uint8), in rounds of at most
    :data:`GATHER_ROUND_BYTES` per rank so the gather buffers stay bounded.
    """
    world = distributed.world_size()
    shards = [distributed.shard_indices(n, r, world) for r in range(world)]
    # An empty shard does not know the row shape (e.g. a predictive layer); the ranks with data do.
    reports = distributed.all_gather_object((tuple(local.shape[1:]), local.dtype.str) if len(local) else None)
    shapes = {rep for rep in reports if rep is not None}
    if len(shapes) != 1:
        raise FeatureError(f"Ranks extracted features of different shapes or dtypes: {sorted(shapes)}")
    (row_shape, dtype_str), = shapes
    dtype = np.dtype(dtype_str)
    row_bytes = max(int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize, 1)
    out = allocate((n, *row_shape), dtype)
    out_bytes = out.reshape(n, -1).view(np.uint8)
    if len(local):
        local_bytes = np.ascontiguousarray(local).reshape(len(local), -1).view(np.uint8)
    else:
        local_bytes = np.empty((0, row_bytes), dtype=np.uint8)
    per_round = max(GATHER_ROUND_BYTES // row_bytes, 1)
    longest = max(len(s) for s in shards)
    for start in range(0, longest, per_round):
        piece = torch.from_numpy(np.ascontiguousarray(local_bytes[start : start + per_round]))
        got = distributed.all_gather_varlen(piece.to(comm_device)).cpu().numpy()
        at = 0
        for s in shards:
            c = max(0, min(per_round, len(s) - start))
            out_bytes[s.start + start : s.start + start + c] = got[at : at + c]
            at += c
    return out


def _comm_device(device: torch.device) -> torch.device:
    """Where gathered tensors must live: NCCL only moves CUDA tensors; gloo moves CPU tensors."""
    return device if distributed.info().backend == "nccl" else torch.device("cpu")


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
    writer = _CacheWriter(key, root) if cache and (world == 1 or distributed.is_main()) else None
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
            local, local_labels, _ = _on_every_rank(lambda: compute_features(model, dataset, indices=shard, **kwargs))
            comm = _comm_device(device)
            feats = _gather_rows(local, n, allocate, comm)
            labels = _gather_rows(local_labels, n, _ram_array, comm)
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
            feats, meta = _on_every_rank(lambda: writer.commit(labels, meta) if writer is not None else (feats, meta))
        elif writer is not None:
            feats, meta = writer.commit(labels, meta)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    log.info("%s: %d images in %.1f s (%.1f images/s)", desc, n, elapsed, n / elapsed)
    return FeatureSet(feats, labels, key, meta, computed=True)
