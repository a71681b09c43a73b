"""Drawing the probes' plots: reliability diagrams, k-NN accuracy vs k, error vs predictive sigma, and the
embedding spectrum. Each ``draw_*`` takes the figure, the records of the plan, the :class:`PlotSpec` and one colour
per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..metrics import ece_from_bins
from ._common import first_seed, first_seed_metric, legend_outside
from .kinds import PlotSpec, finite, grid

#: Reliability bars: the accuracy up to the bin's mean confidence, the accuracy above it (under-confident) and the
#: confidence above the accuracy (over-confident); opaque, so no colour mixes with another.
ACCURACY, UNDER, OVER = "#4C72B0", "#55A868", "#C44E52"
UNDER_FACE, OVER_FACE = "#B9DEC2", "#F2C4C5"
#: A spectrum's last value below this fraction of the one before it is a dropped direction, not a small one.
DROP_RATIO = 1e-3


def _edges(bins: Mapping[str, Any]) -> list[float]:
    n = len(bins["count"])
    return list(bins["edges"]) if bins.get("edges") is not None else [i / n for i in range(n + 1)]


def _reliability_handles() -> tuple[list[Any], list[str]]:
    handles = [Line2D([], [], linestyle="--", color="grey"),
               Patch(facecolor=ACCURACY, edgecolor="black"),
               Patch(facecolor=UNDER_FACE, edgecolor=UNDER, hatch="\\\\"),
               Patch(facecolor=OVER_FACE, edgecolor=OVER, hatch="//")]
    labels = ["perfect calibration (accuracy = confidence)", "accuracy, up to the bin's mean confidence",
              "accuracy above confidence (under-confident)", "confidence above accuracy (over-confident)"]
    return handles, labels


def draw_reliability(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    rows, cols = grid(len(records))
    gs = fig.add_gridspec(rows * 2, cols, height_ratios=[3, 1] * rows)
    for i, r in enumerate(records):
        bins = r.extras["reliability"]
        edges = _edges(bins)
        used = [j for j, n in enumerate(bins["count"]) if n > 0]  # empty bins have no accuracy
        left = [edges[j] for j in used]
        width = [edges[j + 1] - edges[j] for j in used]
        acc = [float(bins["accuracy"][j]) if finite(bins["accuracy"][j]) else 0.0 for j in used]
        conf = [float(bins["confidence"][j]) if finite(bins["confidence"][j]) else 0.0 for j in used]
        row, col = divmod(i, cols)
        ax = fig.add_subplot(gs[2 * row, col])
        axh = fig.add_subplot(gs[2 * row + 1, col], sharex=ax)
        bar = {"width": width, "align": "edge", "linewidth": 0.6}
        # Stacked, never overlapping: accuracy = blue + green, confidence = blue + red.
        ax.bar(left, [min(a, c) for a, c in zip(acc, conf)], color=ACCURACY, edgecolor="black", label="accuracy",
               **bar)
        ax.bar(left, [max(a - c, 0.0) for a, c in zip(acc, conf)], bottom=[min(a, c) for a, c in zip(acc, conf)],
               color=UNDER_FACE, edgecolor=UNDER, hatch="\\\\", label="under-confident", **bar)
        ax.bar(left, [max(c - a, 0.0) for a, c in zip(acc, conf)], bottom=acc, color=OVER_FACE, edgecolor=OVER,
               hatch="//", label="over-confident", **bar)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        # The record's own number: the title and the task's table never disagree.
        ece = first_seed_metric(r, "ece")
        ece = ece_from_bins(bins) if ece is None else ece
        ax.set_title(f"{r.model}\nECE = {100 * ece:.2f}% (seed {first_seed(r)})", fontsize=10)
        ax.set_ylabel("accuracy")
        ax.tick_params(labelbottom=False)
        total = float(sum(bins["count"]))
        axh.bar(edges[:-1], [100 * n / total for n in bins["count"]], width=[b - a for a, b in zip(edges, edges[1:])],
                align="edge", color=colors.get(r.model, "grey"), edgecolor="black", linewidth=0.4)
        axh.set_xlabel("confidence (top-label probability)")
        axh.set_ylabel("samples (%)")
        axh.set_xlim(0, 1)
    legend_outside(fig, *_reliability_handles(), where="lower center", ncols=2)
    fig.suptitle(spec.title, fontsize=11)


def draw_knn(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    all_k: set[int] = set()
    for r in records:
        pairs = sorted((int(k), float(a)) for k, a in r.extras["top1_by_k"].items())
        all_k.update(k for k, _ in pairs)
        ax.plot([k for k, _ in pairs], [100 * a for _, a in pairs], marker="o", color=colors.get(r.model, "grey"),
                label=r.model)
    ax.set_xscale("log")
    ticks = sorted(all_k)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k (number of neighbours, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    legend_outside(fig, *ax.get_legend_handles_labels(), title="model")
    ax.set_title(spec.title, fontsize=11)


def rejection_curve(bins: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy-rejection curve from equal-count sigma bins (lowest sigma first): (the fraction of samples
    rejected [B], the accuracy of those kept [B]) when the 0, 1, ..., B - 1 highest-sigma bins are rejected."""
    counts = np.asarray(bins["count"], dtype=np.float64)
    wrong = counts * np.asarray(bins["error"], dtype=np.float64)
    kept, kept_wrong = np.cumsum(counts)[::-1], np.cumsum(wrong)[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - kept / counts.sum(), 1.0 - kept_wrong / kept


def draw_sigma_error(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    ax_err, ax_rej = fig.subplots(1, 2)
    handles, labels = [], []
    for r in records:
        b = r.extras["sigma_vs_error"]["bins"]
        counts = np.asarray(b["count"], dtype=np.float64)
        error = np.asarray(b["error"], dtype=np.float64)
        centre = 100 * (np.cumsum(counts) - counts / 2) / counts.sum()
        color = colors.get(r.model, "grey")
        (line,) = ax_err.plot(centre, 100 * error, marker="o", color=color)
        ax_err.axhline(100 * float(counts @ error) / counts.sum(), color=color, linestyle=":", linewidth=1.2)
        rejected, accuracy = rejection_curve(b)
        ax_rej.plot(100 * rejected, 100 * accuracy, marker="o", color=color)
        auroc = first_seed_metric(r, "sigma_misclf_auroc")
        handles.append(line)
        labels.append(r.model + (f" (misclassification AUROC {100 * auroc:.1f}%)" if auroc is not None else ""))
    n_bins = len(records[0].extras["sigma_vs_error"]["bins"]["count"])
    ax_err.set_xlabel(f"predictive sigma percentile ({n_bins} equal-count bins, centres)")
    ax_err.set_ylabel("top-1 error in the bin (%)")
    ax_err.set_xlim(0, 100)
    ax_err.set_ylim(bottom=0)
    ax_err.set_title("error per sigma bin (dotted: overall error)", fontsize=10)
    ax_rej.set_xlabel("highest-sigma test images rejected (%)")
    ax_rej.set_ylabel("top-1 accuracy of those kept (%)")
    ax_rej.set_xlim(0, 100)
    ax_rej.set_title("accuracy-rejection curve (flat: sigma carries no signal)", fontsize=10)
    handles.append(Line2D([], [], color="grey", linestyle=":"))
    labels.append("overall top-1 error (all test images)")
    legend_outside(fig, handles, labels, where="lower center", ncols=2)
    fig.suptitle(f"{spec.title} (mean predictive sigma of each test image, seed {first_seed(records[0])})",
                 fontsize=11)


def layernorm_drop(r: Any) -> bool:
    """Whether the record's spectrum ends in LayerNorm's dropped direction: the whole spectrum is stored (as many
    values as ``dim``), the last value is below ``DROP_RATIO`` of the one before, and the model is not one of the
    pixel references (whose features no LayerNorm produces)."""
    s = sorted((float(x) for x in r.extras["spectrum"]), reverse=True)
    info = r.model_info if isinstance(r.model_info, Mapping) else {}
    whole = r.extras.get("dim") == len(s)
    return whole and len(s) > 1 and s[-1] < DROP_RATIO * s[-2] and not str(info.get("arch", "")).startswith("pixels")


def draw_spectrum(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    ends = []
    for r in records:
        s = sorted((float(x) for x in r.extras["spectrum"]), reverse=True)
        top = s[0]
        label = r.model
        er = first_seed_metric(r, "effective_rank")
        if er is not None:
            label += f" (effective rank {er:.1f}, seed {first_seed(r)})"
        # Zeros cannot be drawn on a log axis: clip at 1e-12 of the largest value.
        y = [max(x / top, 1e-12) for x in s]
        ax.plot(range(1, len(s) + 1), y, color=colors.get(r.model, "grey"), label=label, linewidth=1.5)
        if layernorm_drop(r):
            ends.append((len(s), y[-1]))
    ax.set_yscale("log")
    ax.set_xlabel("singular value index (sorted)")
    ax.set_ylabel("singular value / largest (log scale)")
    if ends:
        x, y = max(ends)[0], float(np.exp(np.mean(np.log([e[1] for e in ends]))))
        ax.annotate("last value ~0: the final LayerNorm centres each\nfeature vector, so D features span at most "
                    "D - 1 directions", xy=(x, y), xytext=(0.97, 0.1), textcoords="axes fraction", ha="right",
                    va="bottom", fontsize=8, arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 0.8})
    legend_outside(fig, *ax.get_legend_handles_labels(), where="lower center", ncols=2)
    ax.set_title(spec.title, fontsize=11)
