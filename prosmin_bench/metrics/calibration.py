"""Calibration: top-label expected calibration error (ECE) with equal-width bins (Guo et al., ICML 2017).

Bin convention (checked against netcal 1.4 ``ECE(bins=15)`` and torchmetrics 1.9
``multiclass_calibration_error(norm="l1")``): edges ``linspace(0, 1, n_bins + 1)``, bins left-closed
``[lo, hi)`` with the last bin closed ``[lo, 1]``. Both libraries use left-closed bins (numpy's histogram rule
and ``torch.bucketize(right=True)``), not the ``(lo, hi]`` bins written in Guo et al. Edge cases:

- netcal: identical, except that it clips confidences to ``[eps, 1 - eps]`` first (a 1e-16 shift) and, when
  the labels take at most two distinct values, computes a binary (positive-class) ECE instead of the top-label
  one.
- torchmetrics: same ``[lo, hi)`` bins, but a confidence of exactly 1.0 goes to a bin of its own ``[1, 1]``
  there, while here (and in netcal) it joins the last bin ``[14/15, 1]``. torchmetrics also computes in
  float32, so a confidence within ~1e-7 of an edge k/15 can land in the neighbouring bin, and the result
  differs from float64 in about the 8th digit.
- Guo et al.'s ``(lo, hi]`` bins differ only for a confidence lying exactly on an interior edge k / n_bins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from prosmin_bench.metrics._checks import MetricArgumentError, positive_int, probs_and_labels
from prosmin_bench.metrics.info import FRACTION, MetricInfo

#: 15 equal-width bins, as in Guo et al. (2017) and the ProSMin paper's ECE (docs/protocols.md).
DEFAULT_N_BINS = 15

METRIC_INFO: dict[str, MetricInfo] = {"ece": MetricInfo(higher_is_better=False, unit=FRACTION)}


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="right" puts a value equal to an edge in the bin that starts there: [lo, hi).
    index = np.searchsorted(edges, confidence, side="right") - 1
    return np.minimum(index, n_bins - 1)  # confidence == 1.0 belongs to the last bin, [lo, 1]


def _binned(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of correctness, sum of confidence) for the top-label prediction."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = _bin_index(confidence, n_bins)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    return count, correct_sum, confidence_sum


def _ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    count, correct_sum, confidence_sum = _binned(probs, labels, n_bins)
    # sum_b |B_b|/N * |acc_b - conf_b| = sum_b |sum_{i in b} correct_i - sum_{i in b} conf_i| / N; empty bins add 0.
    return float(np.sum(np.abs(correct_sum - confidence_sum)) / count.sum())


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = DEFAULT_N_BINS) -> float:
    """Top-label ECE, L1: sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over ``n_bins`` equal-width bins in [0, 1].

    probs [N, C], labels [N]. The prediction is ``argmax`` (first index on ties), the confidence its
    probability; bins are ``[lo, hi)`` with the last one ``[lo, 1]`` (see the module docstring). In [0, 1].

    >>> expected_calibration_error([[0.75, 0.25, 0.0], [0.5, 0.25, 0.25]], [0, 1])  # (0.25 + 0.5) / 2
    0.375
    >>> expected_calibration_error([[0.75, 0.25], [0.75, 0.25]], [0, 1])  # one bin: |0.5 - 0.75|
    0.25
    """
    p, y = probs_and_labels(probs, labels)
    n_bins = positive_int(n_bins, "n_bins")
    return _ece(p, y, n_bins)


def reliability_bins(probs: Any, labels: Any, n_bins: int = DEFAULT_N_BINS) -> dict[str, np.ndarray]:
    """The bins behind :func:`expected_calibration_error`, for reliability diagrams.

    Returns ``edges`` [n_bins + 1] and, per bin [n_bins], ``count`` (samples), ``accuracy`` and ``confidence``
    (means over the bin; NaN for an empty bin).

    >>> bins = reliability_bins([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75]], [0, 1, 1], n_bins=2)
    >>> bins["count"].tolist(), bins["accuracy"].tolist(), bins["confidence"].tolist()
    ([0.0, 3.0], [nan, 0.6666666666666666], [nan, 0.75])
    """
    p, y = probs_and_labels(probs, labels)
    n_bins = positive_int(n_bins, "n_bins")
    count, correct_sum, confidence_sum = _binned(p, y, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, correct_sum / count, np.nan)
        confidence = np.where(count > 0, confidence_sum / count, np.nan)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "accuracy": accuracy,
        "confidence": confidence,
    }


def ece_from_bins(bins: Mapping[str, Sequence[float]]) -> float:
    """The ECE of :func:`reliability_bins`' output (or a record's ``reliability`` extras made from it):
    sum_b (n_b / N) |acc_b - conf_b| (Guo et al. 2017, Eq. 3); empty bins add nothing.

    Equal to :func:`expected_calibration_error` on the data the bins came from (up to rounding), because the bins
    are the same.

    >>> ece_from_bins({"confidence": [0.6, 0.9], "accuracy": [0.5, 1.0], "count": [1, 3]})  # (0.1 + 3 * 0.1) / 4
    0.1
    """
    count = np.asarray(bins["count"], dtype=np.float64)
    if count.ndim != 1 or count.size == 0 or not np.all(np.isfinite(count)) or np.any(count < 0) or count.sum() <= 0:
        raise MetricArgumentError(f"Expected `bins['count']` to be non-negative counts with a positive sum, but got "
                                  f"{bins['count']!r}")
    accuracy = np.asarray(bins["accuracy"], dtype=np.float64)
    confidence = np.asarray(bins["confidence"], dtype=np.float64)
    if accuracy.shape != count.shape or confidence.shape != count.shape:
        raise MetricArgumentError(f"Expected `bins` to hold one accuracy and one confidence per count "
                                  f"({count.size}), but got {accuracy.size} and {confidence.size}")
    used = count > 0
    gap = np.abs(accuracy[used] - confidence[used])
    # Rounded at 1e-12: the float noise of the per-bin means (acc_b = correct_b / n_b) is not a digit to show.
    return round(float(np.sum(count[used] * gap) / count.sum()), 12)

