"""Per-sample summaries of a model's predictive sigma [N, K] read in chunks (possibly memory-mapped caches), shared by
the linear (uncertainty vs error) and OOD (sigma and dispersion scores) tasks."""

from __future__ import annotations

from typing import Any

import numpy as np


def row_chunks(n: int, rows: np.ndarray | None, chunk: int) -> list[Any]:
    """Row selections of ``chunk`` rows each: slices of range(n), or pieces of the sorted index array ``rows``."""
    if rows is None:
        return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    return [rows[s : s + chunk] for s in range(0, len(rows), chunk)]


def mean_sigma(sigma: Any, rows: np.ndarray | None = None) -> np.ndarray:
    """Per-sample mean predictive sigma over K: sigma [N, K] (possibly memory-mapped; only ``rows``, sorted, when
    given) -> [N or len(rows)] float64, read in chunks."""
    parts = [np.asarray(sigma[sel], dtype=np.float64).mean(axis=1)
             for sel in row_chunks(int(sigma.shape[0]), rows, 4096)]
    return np.concatenate(parts) if parts else np.zeros(0)
