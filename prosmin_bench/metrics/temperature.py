"""Temperature scaling (Guo et al., On Calibration of Modern Neural Networks, ICML 2017, Sec. 4.2).

One scalar T > 0 divides the logits; it is fitted by minimising the mean negative log-likelihood of
softmax(logits / T) on held-out data (never the test set), and the test probabilities become softmax(logits / T).
T leaves the argmax, hence top-1, unchanged; ``nll_ts`` and ``ece_ts`` of a record are its NLL and ECE after the
scaling, beside the raw ``nll`` / ``ece``.

The minimisation (:func:`fit_temperature`): the NLL is convex in beta = 1/T (its second derivative in beta is the
mean variance of the logits under softmax(beta z)), so it is unimodal in log T, and a bounded Brent search in log T
finds its minimum to 1e-8 in log T (``scipy.optimize.minimize_scalar(method="bounded")``). The bracket is relative
to the logits' own scale s, the root-mean-square of the row-centred logits (of order 1e-3 for a heavily
regularised classifier, 1e2 for a linear head trained at a large lr): T / s in :data:`RELATIVE_BOUNDS` = [1e-3, 1e3]. At
its upper end the scaled logits have RMS 1e-3, so every probability is within about 0.1% of uniform; at its lower
end they have RMS 1e3, so any margin above a few thousandths of s gives a one-hot prediction. Within it lies every
temperature that changes the probabilities measurably; a minimum at an end is one the data cannot pin down: a
held-out set the logits separate perfectly (the NLL falls towards 0 as T -> 0) returns the lower end, and logits
that carry no information about the labels return the upper end.

Why not netcal's ``TemperatureScaling``: it fits probabilities, not logits (it takes log(clip(p, eps, 1 - eps))
as its logits, so probabilities that round to 0 or 1 lose their logit), it returns 1/T as its "temperature", and
importing it costs about 3 s (it imports torch, pyro and gpytorch) while this package imports nothing heavier
than numpy and scipy. On a sharp head (a nearly unregularised softmax regression on scikit-learn's digits, held-out
probabilities down to 1e-74) its T was 4.38 against the NLL minimum's 4.73, its held-out NLL 0.1351 against 0.1345,
and its fit took 12x as long. ``tests/test_temperature.py`` uses netcal as the independent reference instead
(agreement to 1e-4 in T where no probability is clipped; the sharp case above); netcal is in the ``[test]`` extra,
not a runtime dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax

from prosmin_bench.metrics._checks import MetricArgumentError, as_float_array, as_labels
from prosmin_bench.metrics.info import MetricInfo

#: The bracket of T / s searched by :func:`fit_temperature`, s the RMS of the row-centred logits (module docstring).
RELATIVE_BOUNDS = (1e-3, 1e3)

#: The fitted temperature is what the protocol chose: no better direction.
METRIC_INFO: dict[str, MetricInfo] = {"temperature": MetricInfo(score=False)}


def _logits(value: Any, name: str = "logits") -> np.ndarray:
    return as_float_array(value, name, ndim=2)


def temperature_nll(logits: Any, labels: Any, temperature: float) -> float:
    """Mean NLL (nats) of softmax(logits / temperature): logits [N, C], labels [N], computed with log-sum-exp (no
    probability is formed, so nothing is clamped).

    >>> round(temperature_nll([[2.0, 0.0], [0.0, 2.0]], [0, 0], 1.0), 4)  # (ln(1 + e^-2) + ln(1 + e^2)) / 2
    1.1269
    """
    z = _logits(logits)
    y = as_labels(labels, num_classes=z.shape[1], n=z.shape[0])
    t = _positive(temperature, "temperature")
    scaled = z / t
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]))


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise MetricArgumentError(f"Expected `{name}` to be a positive number, but got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MetricArgumentError(f"Expected `{name}` to be a positive number, but got {value!r}") from None
    if not (v > 0 and np.isfinite(v)):
        raise MetricArgumentError(f"Expected `{name}` to be a positive finite number, but got {v:g}")
    return v


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature T > 0 minimising the mean NLL of softmax(logits / T) (Guo et al. 2017, Sec. 4.2).

    logits [N, C] (finite; any per-row shift is allowed) and labels [N] in [0, C) of held-out data, N >= 1. T is
    searched in [1e-3 s, 1e3 s], s the RMS of the row-centred logits (module docstring); 1.0 is returned when the
    NLL does not depend on T (every row's logits are equal).

    >>> logits = np.array([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    >>> t = fit_temperature(logits, [0, 0, 1, 1])  # 3 of 4 right: softmax(4 / T) = 0.75 at T = 4 / ln 3
    >>> round(t, 4), round(float(4 / np.log(3)), 4)
    (3.641, 3.641)
    """
    z = _logits(logits)
    y = as_labels(labels, num_classes=z.shape[1], n=z.shape[0])
    scale = float(np.sqrt(np.mean((z - z.mean(axis=1, keepdims=True)) ** 2)))
    if scale == 0.0:
        return 1.0
    low, high = RELATIVE_BOUNDS[0] * scale, RELATIVE_BOUNDS[1] * scale
    z = z - z.max(axis=1, keepdims=True)  # the NLL is shift-invariant per row; this keeps exp() in range
    picked_mean = float(np.mean(z[np.arange(len(y)), y]))

    def nll(log_t: float) -> float:
        beta = np.exp(-log_t)
        return float(np.mean(logsumexp(beta * z, axis=1)) - beta * picked_mean)

    ends = (np.log(low), np.log(high))
    from scipy.optimize import minimize_scalar  # here, not at import: scipy.optimize costs ~0.15 s (issue 20)

    res = minimize_scalar(nll, bounds=ends, method="bounded", options={"xatol": 1e-8})
    # Where the NLL is flat to float precision near an end (separable data: exactly 0 for every small T), Brent may
    # stop anywhere in the flat part; the end itself is then returned, as documented.
    best = min((nll(e), i, e) for i, e in enumerate(ends))
    log_t = best[2] if best[0] <= res.fun else float(res.x)
    return float(np.clip(np.exp(log_t), low, high))


def temperature_scale(logits: Any, temperature: float) -> np.ndarray:
    """Probabilities softmax(logits / temperature) [N, C] (float64) of logits [N, C].

    >>> temperature_scale([[np.log(3.0), 0.0]], 1.0).round(4).tolist()
    [[0.75, 0.25]]
    >>> temperature_scale([[2.0, 0.0]], 1e9).round(4).tolist()
    [[0.5, 0.5]]
    """
    z = _logits(logits)
    return softmax(z / _positive(temperature, "temperature"), axis=1)
