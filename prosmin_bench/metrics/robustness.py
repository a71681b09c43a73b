"""Corruption robustness: corruption errors (CE), mean CE and relative mCE (Hendrycks & Dietterich, ICLR 2019).

``errors`` always maps each of the 15 ImageNet-C corruption names to its 5 per-severity top-1 errors, fractions
in [0, 1]. Baselines are looked up by corruption name, never by position, and a missing, unknown or malformed
entry is an error rather than a mean over fewer corruptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from prosmin_bench.metrics._checks import MetricArgumentError, as_float_array, real_in_range
from prosmin_bench.metrics.info import PERCENT, MetricInfo

#: The 15 ImageNet-C corruptions in the canonical order of Hendrycks & Dietterich (2019), Table/Figure order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip

#: The four families of the benchmark (Hendrycks & Dietterich 2019, Figure 1).
CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}

#: Number of severity levels per corruption in ImageNet-C.
N_SEVERITIES = 5

#: AlexNet top-1 error on ImageNet-C per corruption and severity 1..5, the mCE normaliser of Hendrycks &
#: Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019
#: (values as distributed with the suite in alexnet_c_errors.csv; their means are the per-corruption AlexNet
#: errors used in the authors' ImageNet-C evaluation code).
ALEXNET_ERRORS: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}

#: AlexNet clean ImageNet top-1 error used for relative mCE. A third-party constant (the value in Hendrycks &
#: Dietterich's ImageNet-C evaluation code, 2019), not measured by this suite (docs/protocols.md).
ALEXNET_CLEAN_ERROR = 0.4345

#: Record names: mCE in percent; a corruption's CE is a ratio of errors (``ce_fog``), shown as recorded.
METRIC_INFO: dict[str, MetricInfo] = {
    "mce": MetricInfo(higher_is_better=False, unit=PERCENT),
    "relative_mce": MetricInfo(higher_is_better=False, unit=PERCENT),
    "ce": MetricInfo(higher_is_better=False),
    "relative_ce": MetricInfo(higher_is_better=False),
}

#: A per-corruption table of 5 per-severity errors, e.g. ``{"fog": (0.2, 0.3, 0.4, 0.5, 0.6), ...}``.
ErrorTable = Mapping[str, Sequence[float]]
Baseline = Union[str, ErrorTable]


def _error_table(errors: Any, name: str) -> dict[str, np.ndarray]:
    """``errors`` checked: exactly the 15 corruptions, each 5 finite errors in [0, 1]; returned by name."""
    if not isinstance(errors, Mapping):
        raise MetricArgumentError(
            f"Expected `{name}` to be a mapping from corruption name to its 5 per-severity errors,"
            f" but got {type(errors).__name__}"
        )
    missing = [c for c in CORRUPTIONS if c not in errors]
    unknown = sorted(str(c) for c in errors if c not in CORRUPTIONS)
    if missing or unknown:
        raise MetricArgumentError(
            f"Expected `{name}` to have exactly the 15 ImageNet-C corruptions, but got missing {missing}"
            f" and unknown {unknown}"
        )
    table = {}
    for corruption in CORRUPTIONS:
        values = as_float_array(errors[corruption], f"{name}['{corruption}']", ndim=1)
        if values.shape[0] != N_SEVERITIES:
            raise MetricArgumentError(
                f"Expected `{name}['{corruption}']` to have {N_SEVERITIES} severities, but got {values.shape[0]}"
            )
        if values.min() < 0.0 or values.max() > 1.0:
            raise MetricArgumentError(
                f"Expected `{name}['{corruption}']` to be errors in [0, 1] (fractions, not percent),"
                f" but got values in [{values.min():g}, {values.max():g}]"
            )
        table[corruption] = values
    return table


def _baseline_table(baseline: Any) -> dict[str, np.ndarray]:
    if isinstance(baseline, str):
        if baseline != "alexnet":
            raise MetricArgumentError(
                f"Expected `baseline` to be 'alexnet' or a mapping of per-severity errors, but got {baseline!r}"
            )
        baseline = ALEXNET_ERRORS
    return _error_table(baseline, "baseline")


def _ratios(
    model: dict[str, np.ndarray], base: dict[str, np.ndarray], model_clean: float, base_clean: float
) -> dict[str, float]:
    out = {}
    for corruption in CORRUPTIONS:
        denominator = float(np.sum(base[corruption] - base_clean))
        if denominator <= 0.0:
            raise MetricArgumentError(
                f"Expected the baseline's errors on '{corruption}' to sum to more than {N_SEVERITIES} x its clean"
                f" error ({N_SEVERITIES * base_clean:g}), but got {float(np.sum(base[corruption])):g}"
            )
        out[corruption] = float(np.sum(model[corruption] - model_clean)) / denominator
    return out


def corruption_errors(errors: ErrorTable, baseline: Baseline = "alexnet") -> dict[str, float]:
    """CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} for each of the 15 corruptions, in ``CORRUPTIONS`` order.

    ``baseline`` is "alexnet" (:data:`ALEXNET_ERRORS`) or a mapping of the same shape as ``errors``.

    >>> half = {c: [e / 2 for e in ALEXNET_ERRORS[c]] for c in CORRUPTIONS}
    >>> corruption_errors(half)["fog"]
    0.5
    """
    return _ratios(_error_table(errors, "errors"), _baseline_table(baseline), 0.0, 0.0)


def mean_corruption_error(errors: ErrorTable, baseline: Baseline = "alexnet") -> float:
    """mCE = 100 * mean over the 15 corruptions of CE_c (see :func:`corruption_errors`). Percent-like scale.

    >>> mean_corruption_error(ALEXNET_ERRORS)
    100.0
    >>> same = {c: [0.5] * 5 for c in CORRUPTIONS}
    >>> mean_corruption_error(same, baseline={c: [0.25] * 5 for c in CORRUPTIONS})
    200.0
    """
    ce = corruption_errors(errors, baseline)
    return 100.0 * float(np.mean([ce[c] for c in CORRUPTIONS]))


def _clean_errors(clean_error: Any, baseline: Baseline, baseline_clean_error: Any) -> tuple[float, float]:
    model_clean = real_in_range(clean_error, "clean_error", 0.0, 1.0)
    if baseline_clean_error is None:
        if not isinstance(baseline, str):
            raise MetricArgumentError(
                "Expected `baseline_clean_error` to be given with a mapping `baseline`, but got None"
            )
        baseline_clean_error = ALEXNET_CLEAN_ERROR  # only "alexnet" survives _baseline_table
    return model_clean, real_in_range(baseline_clean_error, "baseline_clean_error", 0.0, 1.0)


def relative_corruption_errors(
    errors: ErrorTable, clean_error: float, baseline: Baseline = "alexnet", baseline_clean_error: float | None = None
) -> dict[str, float]:
    """Relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean) per corruption.

    With ``baseline="alexnet"`` the baseline clean error defaults to :data:`ALEXNET_CLEAN_ERROR` (0.4345);
    a mapping baseline needs ``baseline_clean_error``. (Hendrycks & Dietterich, ICLR 2019.)

    >>> flat = {c: [0.5] * 5 for c in CORRUPTIONS}
    >>> relative_corruption_errors(flat, 0.3, baseline=flat, baseline_clean_error=0.1)["snow"]
    0.5
    """
    base = _baseline_table(baseline)
    model_clean, base_clean = _clean_errors(clean_error, baseline, baseline_clean_error)
    return _ratios(_error_table(errors, "errors"), base, model_clean, base_clean)


def relative_mean_corruption_error(
    errors: ErrorTable, clean_error: float, baseline: Baseline = "alexnet", baseline_clean_error: float | None = None
) -> float:
    """Relative mCE = 100 * mean over the 15 corruptions of the relative CE_c (:func:`relative_corruption_errors`).

    >>> relative_mean_corruption_error(ALEXNET_ERRORS, 0.4345)
    100.0
    """
    ce = relative_corruption_errors(errors, clean_error, baseline, baseline_clean_error)
    return 100.0 * float(np.mean([ce[c] for c in CORRUPTIONS]))
