"""Classification metrics on predicted probabilities: top-k accuracy and negative log-likelihood.

Inputs are probabilities [N, C] (numpy or torch; rows need not sum exactly to 1, e.g. k-NN vote shares) and
integer labels [N] in [0, C).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prosmin_bench.metrics._checks import positive_int, probs_and_labels
from prosmin_bench.metrics.info import FRACTION, NATS, MetricInfo

#: Probabilities are clamped here before the log so one zero does not make the NLL infinite.
NLL_CLAMP = 1e-12

#: Record names of these metrics (``error`` is 1 - top-1 accuracy, as the corruption tasks record it).
METRIC_INFO: dict[str, MetricInfo] = {
    "top1": MetricInfo(higher_is_better=True, unit=FRACTION),
    "top5": MetricInfo(higher_is_better=True, unit=FRACTION),
    "acc": MetricInfo(higher_is_better=True, unit=FRACTION),
    "accuracy": MetricInfo(higher_is_better=True, unit=FRACTION),
    "error": MetricInfo(higher_is_better=False, unit=FRACTION),
    "nll": MetricInfo(higher_is_better=False, unit=NATS),
}


def _topk_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    # A stable sort of -probs ranks tied classes by index (lower first), so k=1 is exactly np.argmax.
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.any(top == labels[:, None], axis=1)


def accuracy(probs: Any, labels: Any, k: int = 1) -> float:
    """Top-k accuracy: the fraction of samples whose label is among the k most probable classes.

    probs [N, C], labels [N]; ``k`` in 1..C. Ties between equal probabilities are broken towards the lower class
    index (so k=1 is ``argmax``).

    >>> accuracy([[0.9, 0.1], [0.2, 0.8]], [0, 0])
    0.5
    >>> accuracy([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]], [1, 1], k=2)
    1.0
    """
    p, y = probs_and_labels(probs, labels)
    k = positive_int(k, "k", maximum=p.shape[1])
    return float(np.mean(_topk_hits(p, y, k)))


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = probs[np.arange(labels.shape[0]), labels]
    return float(-np.mean(np.log(np.maximum(picked, NLL_CLAMP))))


def negative_log_likelihood(probs: Any, labels: Any) -> float:
    """Mean over samples of -ln p[label], with p clamped at 1e-12 before the log (natural log).

    probs [N, C], labels [N]. Rows are not renormalised (unlike ``sklearn.metrics.log_loss``).

    >>> negative_log_likelihood([[0.5, 0.5], [0.5, 0.5]], [0, 1])  # ln 2
    0.6931471805599453
    >>> round(negative_log_likelihood([[1.0, 0.0]], [1]), 4)  # -ln(1e-12)
    27.631
    """
    p, y = probs_and_labels(probs, labels)
    return _nll(p, y)
