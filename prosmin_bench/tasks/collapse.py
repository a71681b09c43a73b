"""Dimensional collapse measured directly on frozen embeddings (issue 7).

On the features of one dataset (final-norm CLS by default): the singular values of the centred embedding matrix,
the effective rank (RankMe: exp of the entropy of the normalised singular values, Garrido et al., ICML 2023), the
number of principal components holding 99% of the variance, and the mean per-dimension standard deviation of the
L2-normalised embeddings (Chen & He, SimSiam, CVPR 2021, Sec. 4.1; Jing et al., ICLR 2022). For checkpoints made
by the pretraining module for a probabilistic method (ProSMin), the same metrics on the online predictor's mean
``mu`` (in the projection head's output space) and the mean predictive ``sigma``; for every checkpoint made by
the pretraining module, the same metrics on the projector outputs (the evaluated network's backbone -> its projection
head: online for ProSMin and MoCo-v3, target for DINO and iBOT; the space the loss compares in, where collapse is
usually first seen). All the arithmetic is in
``prosmin_bench.metrics.collapse``.

Metrics (``dims_99`` is named after ``variance_fraction``):

- ``effective_rank``: RankMe of the features [N, D], in [1, min(N, D)]; ``effective_rank_frac``: divided by the
  attainable rank min(N - 1, D) (centring removes one dimension), so 1 is isotropic and ~0 collapsed.
- ``dims_99``: principal components for 99% of the variance.
- ``per_dim_std``: about 1/sqrt(D) for an isotropic embedding, 0 when every sample points the same way;
  ``per_dim_std_x_sqrt_d`` = per_dim_std * sqrt(D), comparable across widths (~1 healthy, 0 collapsed).
- ``mu_*``: the same five on the online predictor's mean; ``sigma_mean``: the mean predicted standard deviation
  (ProSMin's own uncertainty scale). Present only for models with a predictive head (absent, not NaN, otherwise).
- ``proj_*``: the same five on the projector outputs [N, K]. Present only for models with a projector (checkpoints
  written by the pretraining module; absent, not NaN, otherwise).

Extras: ``spectrum`` (the leading ``spectrum_size`` singular values normalised to sum 1 over all of them, for the
"log singular values, one line per model" plot), ``dim`` and ``n_samples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CardError
from ..metrics import ScoreSamples, dims_for_variance, effective_rank, per_dim_std, spectrum
from ..metrics.collapse import _effective_rank as entropy_rank  # effective_rank's last step, on singular values
from .base import Task, TaskContext, TaskOutput, register_kind

#: Bootstrap replicates of the effective rank (the record's ``ci95``; it is not a mean over images, so the task
#: resamples itself). 200, not the 1000 of ``metrics.bootstrap.DEFAULT_N_BOOT``: each replicate costs an N x D^2
#: covariance (measured on one busy CPU core: ImageNet val, 50,000 x 384, 0.8 s, so under 3 minutes in all, less
#: with more cores; the mini suite's 360 x 96, 4 ms); 200 is what Efron & Tibshirani (1993, Sec. 6.4) allow for a
#: standard error, so the interval's ends are rougher than the 1000-replicate intervals of the ranked tasks: enough
#: for a diagnostic that is not ranked.
BOOTSTRAP_REPLICATES = 200
#: The row draws are the same for every seed and every model (replicate b of every record resamples the same rows
#: when the records have the same N), so records can be compared replicate by replicate.
BOOTSTRAP_SEED = 0

#: Rows per chunk when averaging a (possibly memory-mapped, [50000, 12000]) sigma bank without reading it whole.
_CHUNK_ROWS = 4096

_EMBEDDING_METRICS = ("effective_rank", "effective_rank_frac", "{dims}", "per_dim_std", "per_dim_std_x_sqrt_d")


def dims_metric_name(fraction: float) -> str:
    """``0.99 -> "dims_99"``, ``0.9 -> "dims_90"``, ``0.999 -> "dims_99.9"``."""
    return f"dims_{round(100.0 * fraction, 6):g}"


def embedding_collapse_metrics(features: Any, variance_fraction: float = 0.99) -> dict[str, float]:
    """The collapse metrics of one embedding matrix [N, D] (N >= 2), keyed as in the module docstring."""
    n, d = int(features.shape[0]), int(features.shape[1])
    er = effective_rank(features)
    pds = per_dim_std(features)
    return {
        "effective_rank": er,
        "effective_rank_frac": er / max(min(n - 1, d), 1),
        dims_metric_name(variance_fraction): float(dims_for_variance(features, variance_fraction)),
        "per_dim_std": pds,
        "per_dim_std_x_sqrt_d": pds * math.sqrt(d),
    }


def normalised_spectrum(features: Any, size: int) -> list[float]:
    """The ``size`` largest singular values of the centred features, divided by the sum of all of them."""
    s = spectrum(features)
    total = float(s.sum())
    s = s / total if total > 0 else s
    return [float(v) for v in s[:size]]


def effective_rank_replicates(x: np.ndarray, n_boot: int = BOOTSTRAP_REPLICATES,
                              seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Bootstrap replicates [n_boot] of the effective rank of the rows of x [N, D]: replicate b is the effective
    rank of ``x[idx_b]`` with ``idx_b = rng.integers(0, N, N)``, ``rng = numpy.random.default_rng(seed)``.

    Computed without forming x[idx_b]: with counts w_i of each row and the count-weighted mean m, the resampled
    centred matrix has the Gram matrix G = sum_i w_i (x_i - m)(x_i - m)^T [D, D], whose eigenvalues are its squared
    singular values (min(N, D) = D of them when N > D), and RankMe (Garrido et al. 2023, Eq. 1) needs only those:
    an N x D^2 product and a D x D eigvalsh instead of an SVD of N x D; for N <= D the same with the N x N Gram
    matrix of the resampled rows. Resampling repeats rows, which lowers the rank when N is not much larger than D: the
    interval shows the spread of the estimate, and can lie below it.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    # N <= D (e.g. the 3,072-pixel reference on 360 images): x[idx] is the smaller side, and its centred Gram matrix
    # [N, N] is C K[idx][:, idx] C with K = x x^T formed once and C the centring matrix; its eigenvalues are the
    # squared singular values (min(N, D) = N of them, as RankMe). An eigh of N x N per replicate instead of an SVD
    # of N x D: 12 times faster for the pixel reference (360 x 3,072).
    gram = x @ x.T if n <= x.shape[1] else None
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        if gram is not None:
            k = gram[np.ix_(idx, idx)]
            k = k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()
        else:
            w = np.bincount(idx, minlength=n).astype(np.float64)
            xc = x - (w @ x) / n
            k = (xc * w[:, None]).T @ xc
        lam = np.linalg.eigvalsh(k)
        # Eigenvalues at rounding level (below size eps lam_max, numpy's matrix_rank rule on the Gram matrix) are
        # zero singular values, which effective_rank zeroes too; their square roots would not be at its rounding level.
        lam = np.where(lam > lam.max() * k.shape[0] * np.finfo(np.float64).eps, lam, 0.0)
        out[b] = entropy_rank(np.sqrt(lam))  # RankMe of those singular values, as effective_rank computes it
    return out


def _rows(features: Any, cap: int, rng: np.random.Generator) -> np.ndarray:
    """All rows as float64, or ``cap`` of them drawn without replacement (sorted, so a memmap reads forward)."""
    n = int(features.shape[0])
    if cap and n > cap:
        return np.asarray(features[np.sort(rng.choice(n, cap, replace=False))], dtype=np.float64)
    return np.asarray(features, dtype=np.float64)


def _chunked_mean(features: Any) -> float:
    total, count = 0.0, 0
    for s in range(0, int(features.shape[0]), _CHUNK_ROWS):
        block = np.asarray(features[s : s + _CHUNK_ROWS], dtype=np.float64)
        total += float(block.sum())
        count += block.size
    return total / max(count, 1)


@dataclass(frozen=True)
class CollapseParams:
    layer: str = "cls"  # final-norm CLS of the evaluated backbone: the features k-NN scores (docs/protocols.md k-NN)
    variance_fraction: float = 0.99  # issue 7: dimensions needed for 99% of the variance
    spectrum_size: int = 256  # leading singular values kept in the record for the spectrum plot
    max_samples: int = 0  # 0 = every row; else a seeded subset (SVD cost grows as N * D * min(N, D))
    predictive: bool = True  # also measure ProSMin's online predictor (mu, sigma) when the checkpoint carries it
    # Rows for the predictive layers, whose width K is 12000 at ImageNet scale (paper): an SVD of 4096 x 12000
    # takes seconds, of 50000 x 12000 hours. The effective rank of mu is then bounded by min(4095, K).
    predictive_max_samples: int = 4096
    projector: bool = True  # also measure the projector outputs when the checkpoint carries the projection head
    # Rows for the projector layer: K is 12000 (ProSMin) or 65536 (DINO) at ImageNet scale, as for predictive_mu.
    projector_max_samples: int = 4096


@register_kind("collapse")
class CollapseTask(Task):
    """Dimensional collapse of frozen embeddings; main score ``effective_rank`` (see the module docstring)."""

    roles = ("data",)
    Params = CollapseParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        if not isinstance(params.layer, str) or not params.layer:
            raise CardError(f"Card {spec.card!r}: protocol field 'layer' must be a feature layer name, e.g. 'cls'")
        if not isinstance(params.variance_fraction, (int, float)) or not 0 < params.variance_fraction < 1:
            raise CardError(
                f"Card {spec.card!r}: protocol field 'variance_fraction' must be in (0, 1), but got "
                f"{params.variance_fraction!r}"
            )
        for name, low in (("spectrum_size", 1), ("max_samples", 0), ("predictive_max_samples", 0),
                          ("projector_max_samples", 0)):
            value = getattr(params, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise CardError(
                    f"Card {spec.card!r}: protocol field {name!r} must be an integer >= {low}, but got {value!r}"
                )
        for name in ("predictive", "projector"):
            if not isinstance(getattr(params, name), bool):
                raise CardError(f"Card {spec.card!r}: protocol field {name!r} must be true or false")
        if 1 in (params.max_samples, params.predictive_max_samples, params.projector_max_samples):
            raise CardError(f"Card {spec.card!r}: a sample cap of 1 leaves nothing to measure; use 0 (all) or >= 2")

    def _embedding_names(self) -> list[str]:
        dims = dims_metric_name(self.params.variance_fraction)
        return [m.format(dims=dims) for m in _EMBEDDING_METRICS]

    def metric_names(self) -> list[str]:
        names = self._embedding_names()
        return names + [f"mu_{m}" for m in names] + ["sigma_mean"] + [f"proj_{m}" for m in names]

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        ref = self.spec.refs["data"]
        fs = ctx.features(ref, p.layer)
        x = _rows(fs.features, p.max_samples, ctx.rng(11))
        metrics = embedding_collapse_metrics(x, p.variance_fraction)
        extras: dict[str, Any] = {
            "spectrum": normalised_spectrum(x, p.spectrum_size), "dim": int(x.shape[1]), "n_samples": int(x.shape[0]),
        }
        if p.predictive and ctx.model.has_predictive:
            mu = ctx.features(ref, "predictive_mu")
            sigma = ctx.features(ref, "predictive_sigma")
            m = _rows(mu.features, p.predictive_max_samples, ctx.rng(12))
            metrics.update({f"mu_{k}": v for k, v in embedding_collapse_metrics(m, p.variance_fraction).items()})
            metrics["sigma_mean"] = _chunked_mean(sigma.features)
            extras["mu_dim"], extras["mu_n_samples"] = int(m.shape[1]), int(m.shape[0])
        if p.projector and ctx.model.has_projector:
            z = _rows(ctx.features(ref, "projector").features, p.projector_max_samples, ctx.rng(13))
            metrics.update({f"proj_{k}": v for k, v in embedding_collapse_metrics(z, p.variance_fraction).items()})
            extras["proj_spectrum"] = normalised_spectrum(z, p.spectrum_size)
            extras["proj_dim"], extras["proj_n_samples"] = int(z.shape[1]), int(z.shape[0])
        samples = None
        if self.spec.main_score == "effective_rank":
            samples = ScoreSamples.replicates("effective_rank", effective_rank_replicates(x))
        return TaskOutput(metrics, extras, samples)
