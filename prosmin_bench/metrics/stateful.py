"""Stateful versions of the suite's metrics for training loops: ``torchmetrics.Metric`` classes.

Each class accumulates over ``update`` calls, syncs its states across processes under DDP (torchmetrics does the
all-reduce / all-gather when ``compute`` runs), and ``compute`` returns what the functional metric of
``prosmin_bench.metrics`` gives on the concatenated data, as float64 tensors on the metric's device:

- :class:`EffectiveRank`: RankMe from a streamed covariance (count, mean [D] and centred scatter [D, D]).
- :class:`PerDimStd`: the mean per-dimension std of the L2-normalised rows, from their streamed mean and variance.
- :class:`OODMetrics`: AUROC, AUPR-In, AUPR-Out and FPR@95%TPR from the gathered confidences and is-OOD flags.
- :class:`CorruptionError`: wrong / total counts per (corruption, severity), then CE, mCE and relative mCE.

Imported explicitly (``from prosmin_bench.metrics.stateful import EffectiveRank``), never by
``import prosmin_bench.metrics``, which stays numpy-only: torchmetrics costs about 2.5 s to import.
Argument errors raise :class:`~prosmin_bench.metrics.MetricArgumentError`, as the functional metrics do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from prosmin_bench.metrics._checks import MetricArgumentError, positive_int, real_in_range, to_numpy
from prosmin_bench.metrics.collapse import NORM_EPS, _effective_rank
from prosmin_bench.metrics.ood import ood_metrics
from prosmin_bench.metrics.robustness import (
    CORRUPTIONS,
    N_SEVERITIES,
    Baseline,
    _baseline_table,
    corruption_errors,
    mean_corruption_error,
    relative_corruption_errors,
    relative_mean_corruption_error,
)

#: The ``corruption`` name under which :class:`CorruptionError` takes the clean (uncorrupted) test set.
CLEAN = "clean"
#: Tensor dtypes read as real numbers besides the floating ones (as numpy's kinds "biu" in the functional checks).
_REAL_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` (tensor, array, nested list) as a detached tensor of real numbers, its dtype kept."""
    x = value.detach() if isinstance(value, torch.Tensor) else None
    if x is None:
        array = to_numpy(value, name)
        if array.dtype.kind not in "biuf":
            raise MetricArgumentError(f"Expected `{name}` to hold real numbers, but got dtype {array.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(array))
    if x.is_complex() or not (x.is_floating_point() or x.dtype in _REAL_INTEGER_DTYPES):
        raise MetricArgumentError(f"Expected `{name}` to hold real numbers, but got dtype {x.dtype}")
    return x


def _tensor(value: Any, name: str, ndim: int, device: torch.device) -> torch.Tensor:
    """``value`` as a finite float64 tensor with ``ndim`` dims on ``device`` (rows may be 0)."""
    x = _as_tensor(value, name)
    if x.ndim != ndim:
        raise MetricArgumentError(f"Expected `{name}` to be {ndim}-dimensional, but got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise MetricArgumentError(f"Expected `{name}` to be finite, but got {bad} NaN or infinite value(s)")
    return x


def _rows(value: Any, num_features: int, device: torch.device) -> torch.Tensor:
    x = _tensor(value, "features", 2, device)
    if x.shape[1] != num_features:
        raise MetricArgumentError(
            f"Expected `features` to have num_features={num_features} columns, but got shape {tuple(x.shape)}"
        )
    return x


def _batch_moments(x: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Count, mean and centred scatter of the rows x [B >= 1, D], packed as one tensor: [0, 0] = B, row 1 = the
    mean [D], rows 2: = sum_i (x_i - mean)(x_i - mean)^T [D, D] (``diagonal``: only its diagonal, [1, D])."""
    out = x.new_zeros((3 if diagonal else x.shape[1] + 2, x.shape[1]))
    out[0, 0] = x.shape[0]
    out[1] = x.mean(dim=0)
    centred = x - out[1]
    out[2:] = (centred * centred).sum(dim=0) if diagonal else centred.T @ centred
    return out


def _merge_moments(a: torch.Tensor, b: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """The packed moments of the union of two row sets from theirs (Chan, Golub & LeVeque, "Updating formulae and a
    pairwise algorithm for computing sample variances", 1979, Eq. 2.1): the scatters add, plus n_a n_b / n times
    the outer product of the difference of the means; no sum of squares of raw values, so a large common mean
    costs no precision (raw sums lose (|mean| / spread)^2 of float64's 16 digits)."""
    n_a, n_b = float(a[0, 0]), float(b[0, 0])
    if n_a == 0.0 or n_b == 0.0:
        return b if n_a == 0.0 else a
    n = n_a + n_b
    delta = b[1] - a[1]
    out = torch.zeros_like(a)
    out[0, 0] = n
    out[1] = a[1] + delta * (n_b / n)
    out[2:] = a[2:] + b[2:] + (delta * delta if diagonal else torch.outer(delta, delta)) * (n_a * n_b / n)
    return out


def _reduce_scatter(stacked: torch.Tensor) -> torch.Tensor:
    """``dist_reduce_fx`` of :class:`EffectiveRank`: merge the moments [P, D + 2, D] of P processes (or of the
    global and the batch state in ``forward``) into one [D + 2, D]."""
    out = stacked[0]
    for other in stacked[1:]:
        out = _merge_moments(out, other, diagonal=False)
    return out


def _reduce_variance(stacked: torch.Tensor) -> torch.Tensor:
    """``dist_reduce_fx`` of :class:`PerDimStd`: merge the moments [P, 3, D] into one [3, D]."""
    out = stacked[0]
    for other in stacked[1:]:
        out = _merge_moments(out, other, diagonal=True)
    return out


def _seen_rows(moments: torch.Tensor, name: str) -> int:
    n = int(moments[0, 0])
    if n < 2:
        raise MetricArgumentError(f"Expected `{name}` to have seen at least 2 rows (samples), but got {n}")
    return n


class EffectiveRank(Metric):
    """RankMe of all rows seen (Garrido et al., "RankMe", ICML 2023, Eq. 1), from a streamed covariance.

    ``update(features [B, D])`` merges the batch's count, mean [D] and centred scatter [D, D] into one float64
    state [D + 2, D] (Chan et al.'s pairwise update; merged the same way across processes under DDP); memory is
    about D^2 float64 values (8 MiB at D = 1024, 1.1 GiB at D = 12000). ``compute()`` -> scalar float64 tensor =
    :func:`prosmin_bench.metrics.effective_rank` of the concatenated rows: the singular values of the centred data
    are the square roots of the eigenvalues of its scatter matrix (the largest min(N, D) of them), then
    exp(entropy) of p_k = sigma_k / sum(sigma) + 1e-7. Needs N >= 2 rows; 0.0 when all rows are identical.

    Singular values count as 0 below eps * max(N, D) * ||X||_F (uncentred; the functional metric's rule) and below
    sqrt(eps * D) * sigma_max, the resolution of an eigendecomposition of the scatter matrix (float64 eps): about
    1e-8 * sigma_max is not resolved, which moves RankMe by ~1e-7 relative per such direction at most. Measured
    against the SVD route on 1000 x 64 rows in 7 batches: 1e-11 relative with a common mean 1e9 times the
    smallest spread, 1e-14 with 1e6 (raw sums of x and x x^T were 2% off at 1e6 and 65% at 1e8).

    >>> m = EffectiveRank(num_features=2)
    >>> m.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    >>> m.update(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    >>> round(m.compute().item(), 4)  # two equal directions
    2.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_features = positive_int(num_features, "num_features")
        d = self.num_features
        self.add_state("moments", default=torch.zeros(d + 2, d, dtype=torch.float64), dist_reduce_fx=_reduce_scatter)

    def update(self, features: Any) -> None:
        """Add the rows of ``features`` [B, D] (any real dtype; converted to float64 on the metric's device)."""
        x = _rows(features, self.num_features, self.device)
        if x.shape[0]:
            self.moments = _merge_moments(self.moments, _batch_moments(x, diagonal=False), diagonal=False)

    def compute(self) -> torch.Tensor:
        n = _seen_rows(self.moments, "EffectiveRank")
        mean, scatter = self.moments[1], self.moments[2:]
        eigenvalues = torch.linalg.eigvalsh(scatter).flip(0)[: min(n, self.num_features)]  # descending
        eps = float(np.finfo(np.float64).eps)
        frobenius_sq = float(torch.trace(scatter)) + n * float(mean @ mean)  # ||X||_F^2 of the uncentred rows
        tol = max(eps * self.num_features * float(eigenvalues[0]),  # the eigendecomposition's resolution
                  (eps * max(n, self.num_features)) ** 2 * frobenius_sq)  # effective_rank's rule for the SVD
        sigma = torch.where(eigenvalues > tol, eigenvalues.clamp_min(0.0).sqrt(), 0.0)
        return torch.tensor(_effective_rank(sigma.cpu().numpy()), dtype=torch.float64, device=self.device)


class PerDimStd(Metric):
    """Mean over dimensions of the std (ddof=0) of the L2-normalised rows seen (SimSiam, Chen & He, CVPR 2021).

    ``update(features [B, D])`` merges the count, mean and sum of squared deviations [D] of the normalised rows
    z = x / max(||x||, 1e-12) into one float64 state [3, D] (Chan et al.'s pairwise update, also across processes);
    ``compute()`` -> scalar float64 tensor = :func:`prosmin_bench.metrics.per_dim_std` of the concatenated rows,
    mean_d sqrt(sum_i (z_id - mean_d)^2 / N). Needs N >= 2 rows.

    >>> m = PerDimStd(num_features=2)
    >>> m.update(torch.tensor([[1.0, 0.0]]))
    >>> m.update(torch.tensor([[0.0, 3.0]]))
    >>> m.compute().item()
    0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_features = positive_int(num_features, "num_features")
        self.add_state("moments", default=torch.zeros(3, self.num_features, dtype=torch.float64),
                       dist_reduce_fx=_reduce_variance)

    def update(self, features: Any) -> None:
        """Add the rows of ``features`` [B, D]."""
        x = _rows(features, self.num_features, self.device)
        if x.shape[0]:
            z = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
            self.moments = _merge_moments(self.moments, _batch_moments(z, diagonal=True), diagonal=True)

    def compute(self) -> torch.Tensor:
        n = _seen_rows(self.moments, "PerDimStd")
        return (self.moments[2] / n).clamp_min(0.0).sqrt().mean()


class OODMetrics(Metric):
    """AUROC, AUPR-In, AUPR-Out and FPR@95%TPR of all confidences seen (Hendrycks & Gimpel, ICLR 2017).

    ``update(confidence [N], is_ood [N])``: confidence is higher for more in-distribution samples; ``is_ood`` is
    bool (or 0/1) with True for OOD samples. Both are kept (float64 list states, gathered across processes).
    ``compute()`` -> ``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` as scalar float64 tensors, equal to
    :func:`prosmin_bench.metrics.ood_metrics` (OOD positive, scored by -confidence; ``aupr_in`` with ID positive)
    on the ID and OOD confidences seen. Needs at least one ID and one OOD sample. ``forward`` also computes the
    value of its batch, so needs both kinds in every batch: call ``update`` otherwise.

    >>> m = OODMetrics()
    >>> m.update(torch.tensor([0.9, 0.8, 0.65]), torch.tensor([False, False, True]))
    >>> m.update(torch.tensor([0.7, 0.6, 0.1]), torch.tensor([False, False, True]))
    >>> {k: v.item() for k, v in m.compute().items()}
    {'auroc': 0.875, 'aupr_in': 0.95, 'aupr_out': 0.8333333333333333, 'fpr95': 0.5}
    """

    is_differentiable = False
    higher_is_better = None  # fpr95 is lower-is-better, the others higher-is-better (metric_info says which)
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")
        # A process that saw no data contributes an empty tensor of the metric's dtype to the all-gather, so that
        # dtype must be the states' own (torchmetrics' Metric._sync_dist); there are no tensor states to convert.
        self.set_dtype(torch.float64)

    def update(self, confidence: Any, is_ood: Any) -> None:
        """Add confidences [N] and their is-OOD flags [N] (bool, or integers 0/1)."""
        conf = _tensor(confidence, "confidence", 1, self.device)
        flags = _as_tensor(is_ood, "is_ood")
        if flags.ndim != 1 or flags.shape[0] != conf.shape[0]:
            raise MetricArgumentError(
                f"Expected `is_ood` to have shape ({conf.shape[0]},) like `confidence`, but got {tuple(flags.shape)}"
            )
        if flags.dtype != torch.bool:
            if flags.is_floating_point():
                raise MetricArgumentError(f"Expected `is_ood` to be bool or integers 0/1, but got dtype {flags.dtype}")
            if flags.numel() and not bool(((flags == 0) | (flags == 1)).all()):
                raise MetricArgumentError(
                    "Expected `is_ood` to be bool or integers 0/1, but got values in"
                    f" [{int(flags.min())}, {int(flags.max())}]"
                )
        self.confidence.append(conf)
        self.is_ood.append(flags.to(device=self.device, dtype=torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        conf = dim_zero_cat(self.confidence).cpu().numpy() if len(self.confidence) else np.zeros(0)
        ood = dim_zero_cat(self.is_ood).cpu().numpy() > 0.5 if len(self.is_ood) else np.zeros(0, bool)
        n_ood = int(ood.sum())
        if n_ood == 0 or n_ood == ood.shape[0]:
            raise MetricArgumentError(
                "Expected `OODMetrics` to have seen at least one ID and one OOD sample, but got"
                f" {ood.shape[0] - n_ood} ID and {n_ood} OOD"
            )
        out = ood_metrics(conf[~ood], conf[ood])
        return {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in out.items()}


def _labels(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """``value`` as an int64 tensor [N] of class indices on ``device``."""
    x = _as_tensor(value, name)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise MetricArgumentError(f"Expected `{name}` to be integer class indices, but got dtype {x.dtype}")
    if x.ndim != 1:
        raise MetricArgumentError(f"Expected `{name}` to be 1-dimensional, but got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int64)


class CorruptionError(Metric):
    """Corruption errors, mCE and relative mCE on ImageNet-C (Hendrycks & Dietterich, ICLR 2019) from streamed counts.

    ``update(preds, target, corruption, severity=None)``: ``preds`` are class scores [N, C] (their argmax is the
    prediction) or predicted labels [N]; ``target`` integer labels [N]; ``corruption`` one of the 15
    :data:`~prosmin_bench.metrics.CORRUPTIONS` with ``severity`` in 1..5, or ``"clean"`` (severity None) for the
    uncorrupted test set. Wrong and total counts per (corruption, severity) [15, 5] and for the clean set are int64,
    summed across processes. ``compute()`` -> dict of scalar float64 tensors named as the corruption task's records:
    ``mce``, ``ce_<c>`` and ``error_<c>_s<k>`` (top-1 error = wrong / total), plus ``clean_error``, ``relative_mce``
    and ``relative_ce_<c>`` once clean samples were seen; the numbers are :func:`~prosmin_bench.metrics.
    mean_corruption_error` and its siblings on that error table. Every corruption needs samples at every severity,
    so call ``update``, not ``forward`` (which would compute the value of its single-cell batch).

    Args:
        baseline: "alexnet" (the mCE normaliser of the paper, :data:`~prosmin_bench.metrics.ALEXNET_ERRORS`) or a
            mapping of each corruption to its 5 per-severity errors.
        baseline_clean_error: the baseline's clean error for relative mCE; defaults to AlexNet's 0.4345 with
            ``baseline="alexnet"`` and must be given with a mapping baseline before clean samples arrive.

    >>> from prosmin_bench.metrics import CORRUPTIONS
    >>> m = CorruptionError()
    >>> for c in CORRUPTIONS:
    ...     for s in range(1, 6):
    ...         m.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 0]), c, s)  # error 0.5
    >>> round(m.compute()["mce"].item(), 2)  # 0.5 / AlexNet's mean error per corruption, averaged
    64.67
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, baseline: Baseline = "alexnet", baseline_clean_error: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _baseline_table(baseline)  # checked now, not after an epoch of updates
        if baseline_clean_error is not None:
            baseline_clean_error = real_in_range(baseline_clean_error, "baseline_clean_error", 0.0, 1.0)
        self.baseline = baseline
        self.baseline_clean_error = baseline_clean_error
        shape = (len(CORRUPTIONS), N_SEVERITIES)
        self.add_state("wrong", default=torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("clean_wrong", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("clean_total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Any, target: Any, corruption: str, severity: int | None = None) -> None:
        """Count the wrong predictions of one batch of ``corruption`` at ``severity`` (see the class docstring)."""
        if corruption == CLEAN:
            if severity is not None:
                raise MetricArgumentError(f"Expected `severity` to be None for the clean set, but got {severity!r}")
            if self.baseline_clean_error is None and not isinstance(self.baseline, str):
                raise MetricArgumentError("Expected `baseline_clean_error` to be given with a mapping `baseline`"
                                          " (relative mCE needs it), but got None")
        elif corruption not in CORRUPTIONS:
            raise MetricArgumentError(
                f"Expected `corruption` to be one of the 15 ImageNet-C corruptions or '{CLEAN}', but got {corruption!r}"
            )
        elif isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= N_SEVERITIES:
            raise MetricArgumentError(
                f"Expected `severity` to be an integer in [1, {N_SEVERITIES}], but got {severity!r}"
            )
        y = _labels(target, "target", self.device)
        preds = _as_tensor(preds, "preds")
        if preds.ndim == 1:  # predicted labels
            pred = _labels(preds, "preds", self.device)
        else:
            pred = _tensor(preds, "preds", 2, self.device).argmax(dim=1)
        if pred.shape[0] != y.shape[0]:
            raise MetricArgumentError(
                f"Expected `target` to have one label per prediction ({pred.shape[0]}), but got {y.shape[0]}"
            )
        wrong = (pred != y).sum()
        if corruption == CLEAN:
            self.clean_wrong += wrong
            self.clean_total += y.shape[0]
        else:
            self.wrong[CORRUPTIONS.index(corruption), severity - 1] += wrong
            self.total[CORRUPTIONS.index(corruption), severity - 1] += y.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        wrong, total = self.wrong.cpu().numpy(), self.total.cpu().numpy()
        empty = [f"{c} s{s + 1}" for i, c in enumerate(CORRUPTIONS) for s in range(N_SEVERITIES) if total[i, s] == 0]
        if empty:
            raise MetricArgumentError(
                "Expected `CorruptionError` to have seen every corruption at every severity, but got no samples for"
                f" {len(empty)} of {total.size}: {', '.join(empty[:4])}{', ...' if len(empty) > 4 else ''}"
            )
        errors = {c: (wrong[i] / total[i]).tolist() for i, c in enumerate(CORRUPTIONS)}
        ce = corruption_errors(errors, baseline=self.baseline)
        out = {"mce": mean_corruption_error(errors, baseline=self.baseline)}
        out.update({f"ce_{c}": ce[c] for c in CORRUPTIONS})
        out.update({f"error_{c}_s{s + 1}": e for c in CORRUPTIONS for s, e in enumerate(errors[c])})
        n_clean = int(self.clean_total)
        if n_clean > 0:
            clean = int(self.clean_wrong) / n_clean
            args = (errors, clean, self.baseline, self.baseline_clean_error)
            rel = relative_corruption_errors(*args)
            out["clean_error"] = clean
            out["relative_mce"] = relative_mean_corruption_error(*args)
            out.update({f"relative_ce_{c}": rel[c] for c in CORRUPTIONS})
        return {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in out.items()}
