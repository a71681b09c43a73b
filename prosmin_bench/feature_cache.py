"""The feature cache's entries on disk: where they live, how they are written, and how a load tells an intact entry
from an edited, damaged or half-written one.

An entry is three files under ``<root>/<key[:2]>/``: ``<key>.npy`` (features [N, D], memory-mappable, so a
1.28M x 1536 float16 bank opens without being read whole), ``<key>.labels.npy`` and the JSON sidecar
``<key>.json``. Each is written under a temporary name and renamed into place (:mod:`prosmin_bench.atomic`), arrays
first and the sidecar (the commit marker) last, so a half-written entry is never read. The sidecar holds a
checksum of both arrays, verified on every load: an entry edited or damaged since it was written is recomputed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import PendingFile, atomic_path, atomic_write_text
from .errors import FeatureError

log = logging.getLogger(__name__)

#: Bytes of features checksummed (and, when written, checked for NaN / inf) per step.
SCAN_CHUNK_BYTES = 16 << 20

#: Entries are written without waiting for the disk (fsync): every load checks the sidecar and both checksums, so
#: an entry a power cut left partly on disk is recomputed, and an ImageNet-size bank does not stall on the flush.
_SYNC = False


def entry_paths(key: str, root: Path) -> tuple[Path, Path, Path]:
    """(features, labels, sidecar) paths of the entry ``key`` under ``root``."""
    d = root / key[:2]
    return d / f"{key}.npy", d / f"{key}.labels.npy", d / f"{key}.json"


def load_entry(key: str, root: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """(features memory-mapped read-only, labels, sidecar) of the entry ``key``, or None when there is no usable one.

    Entries without their JSON sidecar (an interrupted write), unreadable, or whose arrays no longer match the
    checksums in the sidecar (edited or damaged since) are ignored with a warning, so they are recomputed. An
    intact entry holding NaN or inf (counted when it was written: the checksum says the bytes are those) raises a
    FeatureError naming its files.
    """
    fpath, lpath, mpath = entry_paths(key, root)
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
    return feats, labels, meta


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
    """What the JSON sidecar records so :func:`load_entry` can tell an intact entry from an edited one."""
    crc, bad_rows, first_bad = _scan(features)
    return {"features_crc32": crc, "labels_sha256": _labels_sha256(labels), "nonfinite_rows": bad_rows,
            "first_nonfinite_row": first_bad}


def _save_npy(path: Path, array: np.ndarray) -> None:
    # A file object: np.save would append ".npy" to a path without that suffix (the temporary name ends in .tmp).
    with atomic_path(path, sync=_SYNC) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _write_sidecar(path: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(meta, indent=1, sort_keys=True, default=str), sync=_SYNC)


def store_entry(key: str, features: np.ndarray, labels: np.ndarray, meta: dict[str, Any], root: Path) -> None:
    """Write an entry: arrays first, the JSON sidecar (the commit marker) last."""
    fpath, lpath, mpath = entry_paths(key, root)
    features, labels = np.ascontiguousarray(features), np.asarray(labels, dtype=np.int64)
    mpath.unlink(missing_ok=True)  # an entry being replaced stops being one before its arrays change
    _save_npy(fpath, features)
    _save_npy(lpath, labels)
    _write_sidecar(mpath, {"n": len(labels), "dim": int(features.shape[1]), "dtype": features.dtype.name,
                           **meta, **_checksums(features, labels)})


class CacheWriter:
    """An entry being written: features go straight into a temporary ``.npy`` memmap (no in-RAM copy of a large
    bank), renamed into place by :meth:`commit`; :meth:`discard` removes it after a failure."""

    def __init__(self, key: str, root: Path) -> None:
        self.key, self.root = key, root
        self.fpath, self.lpath, self.mpath = entry_paths(key, root)
        self.pending: PendingFile | None = None
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
            self.pending = PendingFile(self.fpath, sync=_SYNC)
            self.array = np.lib.format.open_memmap(self.pending.path, mode="w+", dtype=dtype, shape=shape)
            fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS: the free-space check above stands
            if fallocate is not None:
                with open(self.pending.path, "r+b") as f:
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
        if self.array is None or self.pending is None:
            raise FeatureError("Internal error: a feature cache entry was committed before it was written")
        self.array.flush()
        meta = {**meta, **_checksums(self.array, labels)}
        self.array = None  # unmap before the rename
        try:
            self.mpath.unlink(missing_ok=True)  # an entry being replaced stops being one before its arrays change
            self.pending.commit()
            self.pending = None
            _save_npy(self.lpath, labels)
            _write_sidecar(self.mpath, meta)
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
        if self.pending is not None:
            self.pending.discard()
            self.pending = None


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"
