"""Private ranking arithmetic shared by the OOD and uncertainty metrics: mid-ranks, AUROC and average precision.

AUROC and average precision take a float score array [N] and a boolean positive mask [N] with at least one
positive and one negative, already checked by the caller. Plain numpy: importing ``scipy.stats`` for its
``rankdata`` cost about 0.8 s of every ``import prosmin_bench.metrics`` (issue 20).
"""

from __future__ import annotations

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ascending ranks 1..N of ``values`` [N], ties sharing the mean of their positions (``scipy.stats.rankdata``
    with ``method="average"``), as float64 [N]."""
    x = np.asarray(values).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # runs of equal values: each gets the mean of the 1-based positions it spans, (first + last) / 2
    starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
    ends = np.append(starts[1:], x.shape[0])  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve, P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U with mid-ranks)."""
    ranks = rankdata(scores)  # ascending, ties share their mean rank
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.shape[0] - n_pos
    u = float(np.sum(ranks[positive])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision, sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (highest first).

    A sample is predicted positive at threshold t when its score is >= t, so tied scores enter together; this is
    the step-wise (non-interpolated) definition that scikit-learn's ``average_precision_score`` uses.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    hits = positive[order].astype(np.float64)
    # The last index of each run of equal scores: the thresholds where precision and recall are read.
    last_of_run = np.flatnonzero(np.diff(sorted_scores) != 0)
    last_of_run = np.append(last_of_run, sorted_scores.shape[0] - 1)
    true_pos = np.cumsum(hits)[last_of_run]
    predicted_pos = last_of_run + 1.0
    precision = true_pos / predicted_pos
    recall = true_pos / true_pos[-1]
    recall_step = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_step * precision))


def roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC curve: false and true positive rates [T + 1] at each distinct threshold, highest first, with
    (0, 0) prepended and (1, 1) last; tied scores enter together, so its trapezoid area is :func:`auroc`
    (``sklearn.metrics.roc_curve(positive, scores, drop_intermediate=False)``)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_run = np.append(np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.shape[0] - 1)
    true_pos = np.cumsum(positive[order].astype(np.float64))[last_of_run]
    false_pos = last_of_run + 1.0 - true_pos
    return (np.concatenate([[0.0], false_pos / false_pos[-1]]), np.concatenate([[0.0], true_pos / true_pos[-1]]))
