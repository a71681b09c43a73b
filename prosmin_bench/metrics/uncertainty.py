"""Does a per-sample uncertainty (e.g. ProSMin's predictive sigma) track the per-sample error?

Every function takes an uncertainty score [N] (higher = less certain) and the samples' correctness or error [N].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prosmin_bench.metrics import _ranking
from prosmin_bench.metrics._checks import MetricArgumentError, as_float_array, positive_int, to_numpy
from prosmin_bench.metrics.info import FRACTION, MetricInfo

METRIC_INFO: dict[str, MetricInfo] = {
    "misclassification_auroc": MetricInfo(higher_is_better=True, unit=FRACTION),
    # a correlation, not an error: higher means the uncertainty tracks the error better
    "spearman_uncertainty_error": MetricInfo(higher_is_better=True),
}


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise MetricArgumentError(
            f"Expected `{name_b}` to have one entry per entry of `{name_a}` ({a.shape[0]}), but got {b.shape[0]}"
        )


def _as_correct(correct: Any) -> np.ndarray:
    c = to_numpy(correct, "correct")
    if c.ndim != 1 or c.dtype.kind not in "biu" or not np.all((c == 0) | (c == 1)):
        raise MetricArgumentError(
            f"Expected `correct` to be a 1-dimensional array of booleans or 0/1, but got shape {tuple(c.shape)}"
            f" and dtype {c.dtype}"
        )
    return c


def misclassification_auroc(uncertainty: Any, correct: Any) -> float:
    """AUROC of ``uncertainty`` for detecting misclassified samples (positive) among correct ones.

    uncertainty [N] (higher = less certain), correct [N] bool or 0/1; needs both correct and misclassified
    samples. 1.0 when every error is more uncertain than every correct sample, 0.5 for a constant uncertainty;
    ties count one half (Hendrycks & Gimpel, ICLR 2017, misclassification detection).

    >>> misclassification_auroc([0.9, 0.1, 0.2, 0.8], [False, True, True, False])
    1.0
    >>> misclassification_auroc([0.3, 0.3, 0.3], [True, False, True])
    0.5
    """
    u = as_float_array(uncertainty, "uncertainty", ndim=1)
    c = _as_correct(correct)
    _same_length(u, c, "uncertainty", "correct")
    wrong = c == 0
    n_wrong = int(np.count_nonzero(wrong))
    if n_wrong in (0, u.shape[0]):
        raise MetricArgumentError(
            "Expected `correct` to contain both correct and misclassified samples, but got"
            f" {u.shape[0] - n_wrong} correct and {n_wrong} misclassified"
        )
    return _ranking.auroc(u, wrong)


def spearman_uncertainty_error(uncertainty: Any, error: Any) -> float:
    """Spearman rank correlation between uncertainty [N] and per-sample error [N] (e.g. 0/1 or a loss).

    In [-1, 1]; positive when more uncertain samples have larger errors (the Pearson correlation of the two
    mid-rank vectors, as ``scipy.stats.spearmanr``). Undefined, and an error, when either input is constant.

    >>> spearman_uncertainty_error([0.1, 0.5, 0.3], [1.0, 9.0, 4.0])
    1.0
    >>> spearman_uncertainty_error([0.1, 0.5, 0.3], [3.0, 1.0, 2.0])
    -1.0
    """
    u = as_float_array(uncertainty, "uncertainty", ndim=1)
    e = as_float_array(error, "error", ndim=1)
    _same_length(u, e, "uncertainty", "error")
    for name, values in (("uncertainty", u), ("error", e)):
        if np.all(values == values[0]):
            raise MetricArgumentError(
                f"Expected `{name}` to vary across samples (the rank correlation of a constant is undefined),"
                f" but all {values.shape[0]} values equal {values[0]:g}"
            )
    ru, re_ = _ranking.rankdata(u), _ranking.rankdata(e)
    ru -= ru.mean()
    re_ -= re_.mean()
    return float(np.clip(ru @ re_ / np.sqrt((ru @ ru) * (re_ @ re_)), -1.0, 1.0))


def uncertainty_error_bins(uncertainty: Any, correct: Any, n_bins: int = 10) -> dict[str, list[float]]:
    """Error rate per uncertainty quantile bin: the samples sorted by uncertainty, split into ``n_bins`` bins of
    equal count (sizes differ by at most one; min(n_bins, N) bins), lowest uncertainty first.

    uncertainty [N] (higher = less certain), correct [N] bool or 0/1. Returns lists [B]: ``count``, ``error`` (the
    fraction misclassified), ``uncertainty`` (the bin's mean), ``lower`` and ``upper`` (its smallest and largest
    value). Ties are split in sample order (a stable sort), so the bins are a function of the inputs. Rejecting the
    last k bins (the most uncertain samples) leaves sum(count[:-k]) samples with the error of those bins: the
    accuracy-rejection curve at the bin boundaries.

    >>> b = uncertainty_error_bins([0.1, 0.9, 0.2, 0.8, 0.5], [True, False, True, True, False], n_bins=2)
    >>> b["count"], b["error"], b["upper"]
    ([3, 2], [0.3333333333333333, 0.5], [0.5, 0.9])
    """
    u = as_float_array(uncertainty, "uncertainty", ndim=1)
    c = _as_correct(correct)
    _same_length(u, c, "uncertainty", "correct")
    n = positive_int(n_bins, "n_bins")
    order = np.argsort(u, kind="stable")
    groups = np.array_split(order, min(n, u.shape[0]))
    wrong = c == 0
    return {"count": [int(len(g)) for g in groups], "error": [float(np.mean(wrong[g])) for g in groups],
            "uncertainty": [float(np.mean(u[g])) for g in groups], "lower": [float(u[g].min()) for g in groups],
            "upper": [float(u[g].max()) for g in groups]}
