"""Out-of-distribution detection: confidence scores from logits or features, and the metrics on them.

Convention (docs/protocols.md, OOD): a confidence score is higher for samples that look more in-distribution (ID). The
detection metrics treat OOD as the positive class scored by -confidence (Hendrycks & Gimpel, ICLR 2017), except
``aupr_in``, which treats ID as positive scored by confidence. All values are fractions in [0, 1], not percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import logsumexp

from prosmin_bench.metrics import _ranking
from prosmin_bench.metrics._checks import MetricArgumentError, as_float_array, positive_int, real_in_range
from prosmin_bench.metrics.info import FRACTION, MetricInfo

#: The keys of :func:`ood_metrics`; a task prefixes them with the score it used (``energy_auroc``).
METRIC_INFO: dict[str, MetricInfo] = {
    "auroc": MetricInfo(higher_is_better=True, unit=FRACTION),
    "aupr_in": MetricInfo(higher_is_better=True, unit=FRACTION),
    "aupr_out": MetricInfo(higher_is_better=True, unit=FRACTION),
    "fpr95": MetricInfo(higher_is_better=False, unit=FRACTION),
}

#: Query rows compared at once against the whole training set when ``chunk_size`` is None: bounds the
#: [chunk, N_train] similarity block to 2**24 float64 values (128 MiB).
KNN_BLOCK_ELEMENTS = 2**24
#: Floor on feature norms before L2 normalisation (torch.nn.functional.normalize's default eps), so an all-zero
#: feature row stays zero instead of becoming NaN.
NORM_EPS = 1e-12
#: Points of a compact ROC curve in result records (:func:`compact_roc`).
ROC_POINTS = 101


def _fpr_at_95_tpr(id_conf: np.ndarray, ood_conf: np.ndarray) -> float:
    n = id_conf.shape[0]
    keep = (95 * n + 99) // 100  # ceil(0.95 n) in exact integer arithmetic
    # The largest ID confidence t with #{ID >= t} >= keep is the keep-th largest one (ties only add samples).
    threshold = np.sort(id_conf)[n - keep]
    return float(np.mean(ood_conf >= threshold))


def ood_metrics(id_confidence: Any, ood_confidence: Any) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR@95%TPR for separating ID from OOD samples by a confidence score.

    id_confidence [N_id], ood_confidence [N_ood]; higher = more in-distribution. Definitions:

    - ``auroc``: ROC AUC with OOD positive and score -confidence, i.e. P(c_ood < c_id) + 0.5 P(c_ood = c_id).
    - ``aupr_out``: average precision (step-wise, as scikit-learn) with OOD positive and score -confidence.
    - ``aupr_in``: average precision with ID positive and score confidence.
    - ``fpr95``: let t be the largest ID confidence value such that at least 95% of ID samples
      (ceil(0.95 N_id) of them) have confidence >= t, i.e. the ceil(0.95 N_id)-th largest ID confidence; then
      fpr95 = #{OOD samples with confidence >= t} / N_ood. Ties at t count as accepted for both ID and OOD, so
      the true positive rate is at least 95% (FPR at 95% TPR of ID, as in ODIN, Energy and OpenOOD).

    >>> m = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.65, 0.1])
    >>> m["auroc"], m["fpr95"]
    (0.875, 0.5)
    >>> m["aupr_in"], m["aupr_out"]  # (1 + 1 + 1 + 4/5) / 4 and (1 + 2/3) / 2
    (0.95, 0.8333333333333333)
    """
    id_conf = as_float_array(id_confidence, "id_confidence", ndim=1)
    ood_conf = as_float_array(ood_confidence, "ood_confidence", ndim=1)
    scores = np.concatenate([id_conf, ood_conf])
    is_ood = np.concatenate([np.zeros(id_conf.shape[0], bool), np.ones(ood_conf.shape[0], bool)])
    return {
        "auroc": _ranking.auroc(-scores, is_ood),
        "aupr_in": _ranking.average_precision(scores, ~is_ood),
        "aupr_out": _ranking.average_precision(-scores, is_ood),
        "fpr95": _fpr_at_95_tpr(id_conf, ood_conf),
    }


def ood_roc_curve(id_confidence: Any, ood_confidence: Any) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC curve of :func:`ood_metrics`' ``auroc``: OOD positive, scored by -confidence.

    id_confidence [N_id], ood_confidence [N_ood] -> (fpr [T + 1], tpr [T + 1]): the fraction of ID samples (fpr) and
    of OOD samples (tpr) flagged as OOD at each of the T distinct confidence thresholds, from (0, 0) to (1, 1)
    (``sklearn.metrics.roc_curve(is_ood, -confidence, drop_intermediate=False)``). Tied confidences enter together,
    so the trapezoid area of the polyline is ``ood_metrics(...)["auroc"]`` exactly.

    >>> fpr, tpr = ood_roc_curve([0.9, 0.8, 0.7, 0.6], [0.65, 0.1])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.25, 0.25, 0.5, 0.75, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])
    """
    id_conf = as_float_array(id_confidence, "id_confidence", ndim=1)
    ood_conf = as_float_array(ood_confidence, "ood_confidence", ndim=1)
    is_ood = np.concatenate([np.zeros(id_conf.shape[0], bool), np.ones(ood_conf.shape[0], bool)])
    return _ranking.roc_points(-np.concatenate([id_conf, ood_conf]), is_ood)


def _check_curve(fpr: Any, tpr: Any) -> tuple[np.ndarray, np.ndarray]:
    f = as_float_array(fpr, "fpr", ndim=1)
    t = as_float_array(tpr, "tpr", ndim=1)
    if f.shape != t.shape or f.shape[0] < 2:
        raise MetricArgumentError(
            f"Expected `fpr` and `tpr` of one length >= 2, but got lengths {f.shape[0]} and {t.shape[0]}"
        )
    if np.any(np.diff(f) < 0) or np.any(np.diff(t) < 0) or f[0] != 0 or t[0] != 0 or f[-1] != 1 or t[-1] != 1:
        raise MetricArgumentError("Expected a ROC curve: `fpr` and `tpr` non-decreasing from (0, 0) to (1, 1), but got "
                                  f"({f[0]:g}, {t[0]:g}) ... ({f[-1]:g}, {t[-1]:g}), not monotone or not ending there")
    return f, t


def _tpr_at(f: np.ndarray, t: np.ndarray, x: np.ndarray, side: str) -> np.ndarray:
    """TPR of the polyline (f, t) at each FPR ``x``: the lowest ("left") or highest ("right") point where the
    curve rises vertically at ``x``, linear interpolation elsewhere."""
    last = f.shape[0] - 1
    if side == "right":
        i = np.searchsorted(f, x, side="right") - 1
        j = np.minimum(i + 1, last)
    else:
        j = np.searchsorted(f, x, side="left")
        i = np.maximum(j - 1, 0)
    span = f[j] - f[i]
    w = np.divide(x - f[i], span, out=np.full(x.shape, 0.0 if side == "right" else 1.0), where=span > 0)
    return t[i] + w * (t[j] - t[i])


def average_roc_curves(curves: Sequence[tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Vertical average of ROC curves (Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters
    27, 2006, Sec. 8.1): the mean TPR at every FPR, e.g. over the class splits of open-set recognition.

    ``curves``: (fpr, tpr) polylines, each non-decreasing from (0, 0) to (1, 1). The average is exact at the union
    of their FPR breakpoints (a vertical rise at one FPR is kept as one, between the mean TPRs just before and just
    after it) and linear between them, so its trapezoid area is the mean of the curves' areas.

    >>> fpr, tpr = average_roc_curves([([0, 0, 1], [0, 1, 1]), ([0, 1, 1], [0, 0, 1])])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0])
    """
    checked = [_check_curve(f, t) for f, t in curves]
    if not checked:
        raise MetricArgumentError("Expected at least one ROC curve to average, but got none")
    x = np.unique(np.concatenate([f for f, _ in checked]))
    below = np.mean([_tpr_at(f, t, x, "left") for f, t in checked], axis=0)
    above = np.mean([_tpr_at(f, t, x, "right") for f, t in checked], axis=0)
    fpr, tpr = np.repeat(x, 2), np.column_stack([below, above]).ravel()
    keep = np.concatenate([[True], (np.diff(fpr) != 0) | (np.diff(tpr) != 0)])  # drop repeated points
    return fpr[keep], tpr[keep]


def compact_roc(fpr: Any, tpr: Any, n_points: int = ROC_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """A ROC polyline resampled at ``n_points`` points evenly spaced along its path, fpr + tpr from 0 to 2.

    fpr, tpr [T] (non-decreasing from (0, 0) to (1, 1), e.g. :func:`ood_roc_curve`) -> (fpr [n], tpr [n]), a fixed
    size for result records whatever the number of samples. Spacing by fpr + tpr rather than by fpr alone keeps
    points on the steep start of a good detector's curve, where a fixed FPR grid would cut the corner: with 101
    points the area stays within 1e-3 of the exact one on Gaussian scores with 3 to 10,000 samples per side, with
    and without ties (tests/test_plot_extras.py; 5e-4 at worst over 2,000 such draws), where a 101-point FPR grid
    was off by up to 1.7e-3.

    >>> f, t = compact_roc([0.0, 0.0, 1.0], [0.0, 1.0, 1.0], n_points=5)
    >>> f.tolist(), t.tolist()
    ([0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0, 1.0])
    """
    f, t = _check_curve(fpr, tpr)
    n = positive_int(n_points, "n_points")
    if n < 2:
        raise MetricArgumentError(f"Expected `n_points` >= 2 (both ends of the curve), but got {n}")
    path = f + t  # strictly increasing once repeated points are dropped
    keep = np.concatenate([[True], np.diff(path) > 0])
    grid = np.linspace(0.0, 2.0, n)
    return np.interp(grid, path[keep], f[keep]), np.interp(grid, path[keep], t[keep])


def msp_confidence(logits: Any) -> np.ndarray:
    """Maximum softmax probability per sample (Hendrycks & Gimpel, ICLR 2017). logits [N, C] -> [N] in (0, 1].

    >>> msp_confidence([[0.0, 0.0], [0.0, np.log(3.0)]]).tolist()
    [0.5, 0.75]
    """
    z = as_float_array(logits, "logits", ndim=2)
    # max_c softmax(z)_c = 1 / sum_c exp(z_c - max z), computed without overflow.
    shifted = z - z.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)


def max_logit_confidence(logits: Any) -> np.ndarray:
    """Maximum logit per sample (Hendrycks et al., "Scaling OOD detection", ICML 2022). logits [N, C] -> [N].

    >>> max_logit_confidence([[1.0, 3.0], [-2.0, -5.0]]).tolist()
    [3.0, -2.0]
    """
    return as_float_array(logits, "logits", ndim=2).max(axis=1)


def energy_confidence(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy T * logsumexp(logits / T) per sample (Liu et al., NeurIPS 2020); higher = more ID.

    logits [N, C] -> [N]; ``temperature`` > 0 (the paper uses T = 1).

    >>> energy_confidence([[0.0, 0.0], [2.0, 2.0]]).tolist() == [np.log(2.0), 2.0 + np.log(2.0)]
    True
    >>> energy_confidence([[0.0, 0.0]], temperature=2.0).tolist() == [2.0 * np.log(2.0)]
    True
    """
    z = as_float_array(logits, "logits", ndim=2)
    t = real_in_range(temperature, "temperature", 0.0, np.inf, low_open=True, high_open=True)
    return t * logsumexp(z / t, axis=1)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, NORM_EPS)


def _kth_nearest_distance(train: np.ndarray, test: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    train_n = _l2_normalise(train)
    out = np.empty(test.shape[0], dtype=np.float64)
    for start in range(0, test.shape[0], chunk_size):
        query = _l2_normalise(test[start : start + chunk_size])
        # For unit vectors ||a - b||^2 = 2 - 2 a.b; clip the rounding below 0 before the square root.
        sq_dist = np.maximum(2.0 - 2.0 * (query @ train_n.T), 0.0)
        kth = np.partition(sq_dist, k - 1, axis=1)[:, k - 1]
        out[start : start + chunk_size] = np.sqrt(kth)
    return out


def knn_distance_confidence(
    train_features: Any, test_features: Any, k: int = 1, chunk_size: int | None = None
) -> np.ndarray:
    """Negative distance to the k-th nearest training feature, both L2-normalised (Sun et al., ICML 2022).

    train_features [N_train, D], test_features [N_test, D] -> [N_test] in [-2, 0]; higher = more ID. Sun et
    al. use k = 50 on CIFAR-10 and k = 1000 on ImageNet (full training set). Queries are processed
    ``chunk_size`` rows at a time (default: as many as keep a [chunk, N_train] block within 2**24 values), so
    memory stays bounded. All-zero rows are left at zero rather than normalised (norm floor 1e-12).

    >>> knn_distance_confidence([[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [-1.0, 0.0]]).tolist() == [0.0, -np.sqrt(2)]
    True
    >>> knn_distance_confidence([[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0]], k=2).tolist() == [-np.sqrt(2)]
    True
    """
    train = as_float_array(train_features, "train_features", ndim=2)
    test = as_float_array(test_features, "test_features", ndim=2)
    if train.shape[1] != test.shape[1]:
        raise MetricArgumentError(
            f"Expected `test_features` to have the feature dimension of `train_features` ({train.shape[1]}),"
            f" but got {test.shape[1]}"
        )
    k = positive_int(k, "k", maximum=train.shape[0])
    if chunk_size is None:
        chunk_size = max(1, KNN_BLOCK_ELEMENTS // train.shape[0])
    chunk_size = positive_int(chunk_size, "chunk_size")
    return -_kth_nearest_distance(train, test, k, chunk_size)
