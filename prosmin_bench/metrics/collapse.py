"""Dimensional collapse of an embedding: spectrum, effective rank (RankMe), variance dimensions, per-dim std.

All functions take features [N, D] (N >= 2) and work on the centred matrix X - mean(X) unless said otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prosmin_bench.metrics._checks import MetricArgumentError, as_float_array, real_in_range
from prosmin_bench.metrics.info import MetricInfo

#: RankMe's epsilon added to the normalised singular values before the entropy (Garrido et al., ICML 2023,
#: Eq. 1: p_k = sigma_k / ||sigma||_1 + eps, with eps = 1e-7). It keeps log() finite for zero singular values
#: and adds about 1.6e-6 nats per zero singular value, so the effective rank of a rank-k matrix can exceed k by
#: a relative ~1e-6 * min(N, D).
RANKME_EPS = 1e-7
#: Row-norm floor for L2 normalisation in :func:`per_dim_std` (torch.nn.functional.normalize's default).
NORM_EPS = 1e-12

#: Record names: more spread is better for all of them. ``dims`` is recorded as ``dims_<percent of variance>``
#: (``dims_99``): more components needed for that variance = a less collapsed embedding.
METRIC_INFO: dict[str, MetricInfo] = {
    "effective_rank": MetricInfo(higher_is_better=True),
    "effective_rank_frac": MetricInfo(higher_is_better=True),
    "dims": MetricInfo(higher_is_better=True),
    "per_dim_std": MetricInfo(higher_is_better=True),
    "per_dim_std_x_sqrt_d": MetricInfo(higher_is_better=True),
}


def _features(features: Any) -> np.ndarray:
    x = as_float_array(features, "features", ndim=2)
    if x.shape[0] < 2:
        raise MetricArgumentError(f"Expected `features` to have at least 2 rows (samples), but got {x.shape[0]}")
    return x


def _singular_values(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x - x.mean(axis=0, keepdims=True), compute_uv=False)  # descending


def _signal_singular_values(x: np.ndarray) -> np.ndarray:
    """Singular values of the centred matrix with those at rounding level set to 0.

    Centring identical rows leaves residues of order eps * |mean|, whose spectrum would otherwise look like a
    full-rank embedding; the threshold eps * max(N, D) * ||X||_F (uncentred) follows numpy's matrix_rank rule.
    """
    sigma = _singular_values(x)
    tol = np.finfo(np.float64).eps * max(x.shape) * float(np.linalg.norm(x))
    return np.where(sigma > tol, sigma, 0.0)


def spectrum(features: Any) -> np.ndarray:
    """Singular values of the centred feature matrix, descending. features [N, D] -> [min(N, D)].

    >>> spectrum([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]).round(6).tolist()  # [sqrt(8), sqrt(2)]
    [2.828427, 1.414214]
    """
    return _singular_values(_features(features))


def _effective_rank(sigma: np.ndarray) -> float:
    total = sigma.sum()
    if total == 0.0:
        return 0.0  # every sample is the same point: rank 0
    p = sigma / total + RANKME_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank(features: Any) -> float:
    """RankMe: exp of the Shannon entropy of the centred singular values normalised to sum 1.

    features [N, D] -> a float in [1, min(N, D)] (up to RANKME_EPS; 0.0 when all rows are identical).
    Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised representations
    by their rank", ICML 2023, Eq. 1, with eps = 1e-7, applied to centred features (docs/protocols.md, collapse).

    >>> round(effective_rank([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]), 4)  # two equal directions
    2.0
    >>> round(effective_rank([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), 4)  # points on a line
    1.0
    """
    return _effective_rank(_signal_singular_values(_features(features)))


def dims_for_variance(features: Any, fraction: float = 0.99) -> int:
    """Number of principal components that explain ``fraction`` of the variance (squared singular values).

    features [N, D]; ``fraction`` in (0, 1]. The smallest m with sum_{k<=m} s_k^2 >= fraction * sum_k s_k^2;
    0 when all rows are identical. With fraction = 1 rounding noise can count, so use 0.99 or similar.

    >>> dims_for_variance([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]], 0.9)  # variances 18 and 2
    1
    >>> dims_for_variance([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]], 0.99)
    2
    """
    x = _features(features)
    fraction = real_in_range(fraction, "fraction", 0.0, 1.0, low_open=True)
    variance = _signal_singular_values(x) ** 2
    cumulative = np.cumsum(variance)
    if cumulative[-1] == 0.0:
        return 0
    m = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left")) + 1
    return min(m, variance.shape[0])


def per_dim_std(features: Any) -> float:
    """Mean over dimensions of the standard deviation (over samples, ddof=0) of the L2-normalised embeddings.

    features [N, D] -> float; about 1/sqrt(D) for an isotropic embedding and 0 when every sample collapses to
    one direction (Chen & He, "SimSiam", CVPR 2021, Sec. 4.1; Jing et al., ICLR 2022). Features are not
    centred before normalising; all-zero rows stay zero (norm floor 1e-12).

    >>> per_dim_std([[1.0, 0.0], [0.0, 1.0]])
    0.5
    >>> per_dim_std([[2.0, 0.0], [5.0, 0.0]])
    0.0
    """
    x = _features(features)
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS)
    return float(np.mean(np.std(z, axis=0)))
