"""Pure metric functions: classification, calibration (and temperature scaling, ``metrics.temperature``), OOD
detection, corruption robustness, collapse, uncertainty, and bootstrap confidence intervals of a score from its
per-sample values (``metrics.bootstrap``).

Imports nothing from the rest of ``prosmin_bench``, so ``from prosmin_bench.metrics import
expected_calibration_error`` works in any project. Every function accepts numpy arrays or torch tensors
(probabilities [N, C], integer labels [N]), returns Python floats (or numpy arrays for per-sample scores), and
raises :class:`MetricArgumentError` (a ``ValueError``) for unusable arguments. :func:`metric_info` says which way
is better for a recorded metric name, its unit and its table group (one table, declared beside the functions).
``prosmin_bench.metrics.stateful`` holds torchmetrics ``Metric`` versions for training loops (DDP-synced); it is
imported on first use, so importing this package never imports torch.
"""

from prosmin_bench.metrics._checks import MetricArgumentError
from prosmin_bench.metrics.bootstrap import ScoreSamples, bootstrap_ci, paired_bootstrap_ci, pooled_bootstrap_ci
from prosmin_bench.metrics.calibration import ece_from_bins, expected_calibration_error, reliability_bins
from prosmin_bench.metrics.classification import accuracy, negative_log_likelihood
from prosmin_bench.metrics.collapse import dims_for_variance, effective_rank, per_dim_std, spectrum
from prosmin_bench.metrics.info import MetricInfo
from prosmin_bench.metrics.names import higher_is_better, metric_info, parse_metric_name
from prosmin_bench.metrics.ood import (
    average_roc_curves,
    compact_roc,
    energy_confidence,
    knn_distance_confidence,
    max_logit_confidence,
    msp_confidence,
    ood_metrics,
    ood_roc_curve,
)
from prosmin_bench.metrics.robustness import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    CORRUPTION_GROUPS,
    CORRUPTIONS,
    corruption_errors,
    mean_corruption_error,
    relative_corruption_errors,
    relative_mean_corruption_error,
)
from prosmin_bench.metrics.temperature import fit_temperature, temperature_nll, temperature_scale
from prosmin_bench.metrics.uncertainty import (
    misclassification_auroc,
    spearman_uncertainty_error,
    uncertainty_error_bins,
)

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "CORRUPTIONS",
    "CORRUPTION_GROUPS",
    "MetricArgumentError",
    "MetricInfo",
    "ScoreSamples",
    "accuracy",
    "average_roc_curves",
    "bootstrap_ci",
    "compact_roc",
    "corruption_errors",
    "dims_for_variance",
    "ece_from_bins",
    "effective_rank",
    "energy_confidence",
    "expected_calibration_error",
    "fit_temperature",
    "higher_is_better",
    "knn_distance_confidence",
    "max_logit_confidence",
    "mean_corruption_error",
    "metric_info",
    "misclassification_auroc",
    "msp_confidence",
    "negative_log_likelihood",
    "ood_metrics",
    "ood_roc_curve",
    "paired_bootstrap_ci",
    "parse_metric_name",
    "per_dim_std",
    "pooled_bootstrap_ci",
    "relative_corruption_errors",
    "relative_mean_corruption_error",
    "reliability_bins",
    "spearman_uncertainty_error",
    "spectrum",
    "temperature_nll",
    "temperature_scale",
    "uncertainty_error_bins",
]


def __getattr__(name: str):
    """``prosmin_bench.metrics.stateful`` on first access (PEP 562): torch and torchmetrics load only then."""
    if name == "stateful":
        import importlib

        return importlib.import_module("prosmin_bench.metrics.stateful")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
