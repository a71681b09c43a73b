"""Leaderboard plots (PNG) drawn from the ``extras`` of result records: a pure function of the records.

Each plot kind reads one key of ``ResultRecord.extras`` (the runner keeps the extras of the first seed; a dotted
key reads into a nested mapping). A task kind that wants a plot only has to put the key in its
``TaskOutput.extras``; records without the key are left out of the plot, records with a malformed value too
(logged), and a plot with no usable record is not drawn. Legends sit outside the axes. Expected keys:

``reliability`` (linear, low-shot, ... any classifier)
    ``{"confidence": [B], "accuracy": [B], "count": [B]}``: per equal-width bin of top-label confidence, the mean
    confidence, the accuracy (NaN for an empty bin) and the number of samples; optional ``"edges": [B + 1]``
    (default: B equal-width bins on [0, 1]). ``prosmin_bench.metrics.reliability_bins`` returns this layout, with
    the bin edges of the record's ECE. The panel title shows the record's ``ece`` for that seed (the ECE of the
    bins, ``prosmin_bench.metrics.ece_from_bins``, when the record has none).
``top1_by_k`` (knn)
    ``{"10": 0.71, "20": 0.73, ...}``: top-1 accuracy (fraction) for each k (keys are str(k)).
``sigma_vs_error.bins`` (linear, models with a predictive sigma)
    ``{"count": [B], "error": [B], ...}``: top-1 error per equal-count bin of the mean predictive sigma, lowest
    first (``prosmin_bench.metrics.uncertainty_error_bins``); drawn as error per bin with the overall error, and as
    the accuracy-rejection curve that rejecting the highest-sigma bins gives. The legend shows the record's
    ``sigma_misclf_auroc``.
``msp_hist`` (ood)
    ``{"id": {"edges": [B + 1], "counts": [B]}, "ood": {"edges": [B + 1], "counts": [B]}}``: histograms of the
    confidence (max softmax probability) of in-distribution and OOD samples, drawn by ``seaborn.histplot``, with
    a weighted KDE where the counts are not piled in one bin; extra keys (e.g. ``"quantiles"``) are ignored. The
    legend names the record's ``test`` and ``ood`` datasets; the panel title shows the record's ``auroc``.
``roc`` (ood)
    ``{score: {"fpr": [P], "tpr": [P]}}``: a ROC curve per OOD score, OOD positive (``metrics.compact_roc``
    points), drawn in the order of ``tasks/ood.py`` with the chance diagonal; the legend shows the record's
    ``auroc`` / ``<score>_auroc`` for that seed (the curve's area for a score the record has no AUROC of).
``errors`` (corruption)
    ``{corruption: [5 top-1 errors, severity 1..5], ...}`` as fractions in [0, 1], drawn in ImageNet-C's
    canonical order; the record's ``clean_error`` metric for that seed, when present, is drawn as a reference line,
    and, when the record has them, ``chance_error`` (1 - 1/C) and the errors of ``baseline`` (``{"name",
    "errors": {corruption: [5]}}``, the model the mCE is normalised by).
``spectrum`` (collapse)
    ``[D]`` singular values of the centred embedding matrix (any scale, any order: drawn sorted, divided by the
    largest); the legend shows the record's ``effective_rank`` for that seed. When the whole spectrum is stored
    (``dim`` values) and its last value drops to ~0, a note says that LayerNorm's centring removed that direction.

Determinism: no randomness (no bootstrapped intervals), matplotlib's default style reset inside an
``rc_context`` (a user's matplotlibrc does not leak in), fixed size and dpi, and the PNG ``Software`` metadata
removed, so the same records give the same bytes with the same matplotlib and fonts.

Planning (:mod:`.kinds`) needs no plotting library; drawing (:mod:`.drawing`, with one ``draw_*`` module per
family of kinds) does.

>>> [(k.name, k.extras_key) for k in PLOT_KINDS][:3]
[('knn_k', 'top1_by_k'), ('reliability', 'reliability'), ('sigma_error', 'sigma_vs_error.bins')]
"""

from __future__ import annotations

from typing import Any

from .kinds import PLOT_KINDS, PlotKind, PlotSpec, plan

__all__ = ["PLOT_KINDS", "PlotKind", "PlotSpec", "draw", "figure", "model_colors", "plan"]

_DRAWING = ("draw", "figure", "model_colors")


def __getattr__(name: str) -> Any:
    """The drawing functions, loaded on first use: matplotlib and seaborn (with pandas) take about a second to
    import, and ``prosmin_bench.api`` reaches this package through the leaderboard without drawing anything."""
    if name in _DRAWING:
        from . import drawing

        return getattr(drawing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
