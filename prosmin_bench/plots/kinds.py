"""Plot kinds: the ``extras`` key each reads and how a value is checked, and the plan of a task's figures.

Planning needs no plotting library (the leaderboard links figures without drawing them); :mod:`.drawing` draws.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Panels per row in small-multiple figures (one panel per model).
PANELS_PER_ROW = 4


@dataclass(frozen=True)
class PlotSpec:
    """One planned figure: which plot kind, for which task (current version) and models, and its file name."""

    kind: str
    task: str
    task_version: int
    models: tuple[str, ...]
    filename: str
    title: str  # drawn on the figure
    caption: str  # the markdown alt text: the title and what was drawn


def finite(x: Any) -> bool:
    """True for a real, finite number (not a bool, not NaN or infinite)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number_or_nan(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------- extras checks
def _valid_reliability(v: Any) -> bool:
    if not isinstance(v, Mapping) or not all(k in v for k in ("confidence", "accuracy", "count")):
        return False
    conf, acc, cnt = v["confidence"], v["accuracy"], v["count"]
    if not all(isinstance(x, list) for x in (conf, acc, cnt)) or not (len(conf) == len(acc) == len(cnt) > 0):
        return False
    if not all(_number_or_nan(x) for x in conf + acc) or not all(finite(c) and c >= 0 for c in cnt):
        return False
    if sum(cnt) <= 0:
        return False
    edges = v.get("edges")
    return edges is None or (isinstance(edges, list) and len(edges) == len(cnt) + 1 and all(finite(e) for e in edges))


def _valid_top1_by_k(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v:
        return False
    try:
        return all(int(k) >= 1 and finite(a) for k, a in v.items())
    except (TypeError, ValueError):
        return False


def _valid_hist(h: Any) -> bool:
    if not isinstance(h, Mapping) or not isinstance(h.get("edges"), list) or not isinstance(h.get("counts"), list):
        return False
    e, c = h["edges"], h["counts"]
    return len(e) == len(c) + 1 and len(c) > 0 and all(finite(x) for x in e + c) and sum(c) > 0


def _valid_msp_hist(v: Any) -> bool:
    return isinstance(v, Mapping) and _valid_hist(v.get("id")) and _valid_hist(v.get("ood"))


def _valid_corruption_errors(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v:
        return False
    return all(isinstance(e, list) and len(e) == 5 and all(finite(x) for x in e) for e in v.values())


def _valid_spectrum(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(finite(x) and x >= 0 for x in v) and max(v) > 0


def _rate_list(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(finite(x) and 0 <= x <= 1 for x in v)


def _valid_roc(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v:
        return False
    for curve in v.values():
        if not isinstance(curve, Mapping) or not isinstance(curve.get("fpr"), list):
            return False
        fpr, tpr = curve["fpr"], curve.get("tpr")
        if len(fpr) < 2 or not _rate_list(fpr, len(fpr)) or not _rate_list(tpr, len(fpr)):
            return False
        if any(b < a for a, b in zip(fpr, fpr[1:])) or any(b < a for a, b in zip(tpr, tpr[1:])):
            return False
    return True


def _valid_sigma_bins(v: Any) -> bool:
    if not isinstance(v, Mapping) or not isinstance(v.get("count"), list) or not v["count"]:
        return False
    n = len(v["count"])
    if not all(finite(c) and c >= 0 for c in v["count"]) or sum(v["count"]) <= 0 or not _rate_list(v.get("error"), n):
        return False
    return all(k not in v or (isinstance(v[k], list) and len(v[k]) == n and all(finite(x) for x in v[k]))
               for k in ("uncertainty", "lower", "upper"))


def extras_value(extras: Any, key: str) -> Any:
    """``extras[key]``, following dots into nested mappings (``"sigma_vs_error.bins"``); None where absent."""
    value = extras
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def grid(n: int) -> tuple[int, int]:
    """(rows, columns) of a small-multiple figure of ``n`` panels."""
    cols = min(n, PANELS_PER_ROW)
    return math.ceil(n / cols), cols


# ---------------------------------------------------------------------------------------------- kinds and plan
@dataclass(frozen=True)
class PlotKind:
    """A plot kind: the extras key it reads, how to check it, and its figure size (``drawing`` draws it)."""

    name: str
    extras_key: str
    valid: Callable[[Any], bool]
    caption: str
    size: Callable[[int], tuple[float, float]]  # number of models -> (width, height) in inches


def _small_multiples(per_row_height: float, legend: float = 0.0) -> Callable[[int], tuple[float, float]]:
    """Figure size of one panel per model, ``legend`` inches added for a figure legend below the panels."""

    def size(n: int) -> tuple[float, float]:
        rows, cols = grid(n)
        return max(3.6 * cols, 6.5), per_row_height * rows + 0.7 + legend

    return size


#: Plot kinds in the order they appear in a task section. Legends sit outside the axes (sizes leave room).
PLOT_KINDS: tuple[PlotKind, ...] = (
    PlotKind("knn_k", "top1_by_k", _valid_top1_by_k, "k-NN top-1 accuracy vs k",
             lambda n: (8.4, 4.2)),
    PlotKind("reliability", "reliability", _valid_reliability, "reliability diagrams",
             _small_multiples(4.4, legend=0.5)),
    PlotKind("sigma_error", "sigma_vs_error.bins", _valid_sigma_bins,
             "top-1 error vs predictive sigma", lambda n: (11.5, 4.4)),
    PlotKind("ood_hist", "msp_hist", _valid_msp_hist, "confidence histograms, ID vs OOD",
             _small_multiples(3.4, legend=0.5)),
    PlotKind("ood_roc", "roc", _valid_roc, "ROC curves of every OOD score, OOD as the positive class",
             _small_multiples(4.7)),
    PlotKind("corruption", "errors", _valid_corruption_errors,
             "top-1 error per corruption and severity", lambda n: (11.0, 2.9 * n + 1.6)),
    PlotKind("severity", "errors", _valid_corruption_errors,
             "top-1 error vs corruption severity", lambda n: (9.6, 4.6)),
    PlotKind("spectrum", "spectrum", _valid_spectrum,
             "singular values of the embeddings", lambda n: (8.0, 4.6 + 0.2 * math.ceil(n / 2))),
)
KINDS = {k.name: k for k in PLOT_KINDS}


def plan(records: Sequence[Any]) -> list[PlotSpec]:
    """The figures for the records of one task version (one per plot kind with at least one usable record).

    ``records``: ResultRecords of a single task and version. Records whose extras lack a kind's key or hold a
    malformed value are left out of that figure.

    >>> plan([]), [k.name for k in PLOT_KINDS]
    ([], ['knn_k', 'reliability', 'sigma_error', 'ood_hist', 'ood_roc', 'corruption', 'severity', 'spectrum'])
    """
    if not records:
        return []
    task, version = records[0].task, records[0].task_version
    specs = []
    for kind in PLOT_KINDS:
        models = []
        for r in sorted(records, key=lambda r: r.model):
            value = extras_value(r.extras, kind.extras_key)
            if value is None:
                continue
            if kind.valid(value):
                models.append(r.model)
            else:
                log.warning("%s / %s: extras[%r] is malformed; left out of the %s plot", r.model, task,
                            kind.extras_key, kind.name)
        if models:
            specs.append(PlotSpec(kind=kind.name, task=task, task_version=version, models=tuple(models),
                                  filename=f"{task}_{kind.name}.png", title=f"{task}@{version}: {kind.caption}",
                                  caption=f"{task}@{version}: {kind.caption} (first seed of each record)"))
    return specs
