"""Out-of-distribution detection: confidence scores from logits or features, and the metrics on them.

Convention (docs/protocols.md, OOD): a confidence score is higher for samples that look more in-distribution (ID). The
detection metrics treat OOD as the positive class scored by -confidence (Hendrycks & Gimpel, ICLR 2017), except
``aupr_in``, which treats ID as positive scored by confidence. All values are fractions in [0, 1], not percent.
"""

from __future__ import annotations

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
