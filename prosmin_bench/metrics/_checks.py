"""Argument checks shared by the metric functions: the thin shell around the arithmetic.

Every public metric converts its inputs here (numpy arrays, torch tensors or nested lists become numpy float64,
labels int64) and raises :class:`MetricArgumentError` with a one-line "Expected ..., but got ..." message
(torchmetrics' wording) when an argument is unusable. This module imports nothing from the rest of
``prosmin_bench`` so the metrics package can be used on its own.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


class MetricArgumentError(ValueError):
    """A metric was called with an argument it cannot use (wrong shape, non-finite values, bad option)."""


def _describe(value: Any) -> str:
    """A short description of ``value`` for an error message (shape and dtype for arrays)."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return repr(value)


def to_numpy(value: Any, name: str) -> np.ndarray:
    """``value`` (numpy array, torch tensor, list, scalar) as a numpy array, without changing its kind of dtype.

    Torch tensors are detached and moved to the CPU; floating tensors (including bfloat16/float16, which numpy
    cannot always read) are widened to float64 first. Torch is never imported here: tensors are recognised by
    their methods, so the package works where torch is absent.
    """
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.double()
        value = tensor.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nested lists and the like
        raise MetricArgumentError(f"Expected `{name}` to be an array or tensor, but got {value!r} ({exc})") from exc
    if array.dtype == object:
        raise MetricArgumentError(
            f"Expected `{name}` to be a numeric array or tensor, but got {type(value).__name__} of objects"
        )
    return array


def as_float_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """``value`` as a finite float64 array with ``ndim`` dimensions and at least one element along each axis."""
    array = to_numpy(value, name)
    if array.dtype.kind not in "biuf":
        raise MetricArgumentError(f"Expected `{name}` to hold real numbers, but got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if array.ndim != ndim:
        raise MetricArgumentError(
            f"Expected `{name}` to be {ndim}-dimensional, but got shape {tuple(array.shape)}"
        )
    if array.size == 0 or 0 in array.shape:
        raise MetricArgumentError(f"Expected `{name}` to be non-empty, but got shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise MetricArgumentError(f"Expected `{name}` to be finite, but got {bad} NaN or infinite value(s)")
    return array


def as_probabilities(value: Any, name: str = "probs") -> np.ndarray:
    """``value`` as a float64 array [N, C] with every entry in [0, 1] (rows need not sum exactly to 1)."""
    probs = as_float_array(value, name, ndim=2)
    low, high = float(probs.min()), float(probs.max())
    if low < 0.0 or high > 1.0:
        raise MetricArgumentError(
            f"Expected `{name}` to be probabilities in [0, 1], but got values in [{low:g}, {high:g}]"
            " (pass softmax(logits), not logits)"
        )
    return probs


def as_labels(value: Any, num_classes: int, n: int, name: str = "labels") -> np.ndarray:
    """``value`` as an int64 array [n] with entries in [0, num_classes)."""
    array = to_numpy(value, name)
    if array.dtype.kind not in "iu":
        raise MetricArgumentError(f"Expected `{name}` to be integer class indices, but got dtype {array.dtype}")
    if array.ndim != 1:
        raise MetricArgumentError(f"Expected `{name}` to be 1-dimensional, but got shape {tuple(array.shape)}")
    if array.shape[0] != n:
        raise MetricArgumentError(
            f"Expected `{name}` to have one entry per row of the predictions ({n}), but got {array.shape[0]}"
        )
    array = array.astype(np.int64, copy=False)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_classes:
        raise MetricArgumentError(
            f"Expected `{name}` to be in [0, {num_classes}), but got values in [{low}, {high}]"
        )
    return array


def probs_and_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked (probs [N, C] float64, labels [N] int64)."""
    p = as_probabilities(probs)
    y = as_labels(labels, num_classes=p.shape[1], n=p.shape[0])
    return p, y


def positive_int(value: Any, name: str, maximum: int | None = None) -> int:
    """``value`` as a Python int >= 1 (and <= ``maximum`` when given); bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise MetricArgumentError(f"Expected `{name}` to be a positive integer, but got {_describe(value)}")
    if maximum is not None and value > maximum:
        raise MetricArgumentError(f"Expected `{name}` to be an integer in [1, {maximum}], but got {value}")
    return int(value)


def real_in_range(
    value: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a finite Python float inside the interval [low, high] (ends open when asked)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        array = to_numpy(value, name)
        if array.ndim != 0 or array.dtype.kind not in "iuf":
            raise MetricArgumentError(f"Expected `{name}` to be a number in {interval}, but got {_describe(value)}")
        value = array.item()
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not np.isfinite(value) or too_low or too_high:
        raise MetricArgumentError(f"Expected `{name}` to be a number in {interval}, but got {value:g}")
    return value
