"""Drawing the planned figures: one ``draw_*`` function per plot kind, on matplotlib figures styled by seaborn.

Every ``draw_*`` function takes the figure, the records to draw (those the plan chose), the :class:`PlotSpec` and
one colour per model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import seaborn as sns
from matplotlib.figure import Figure

from ..atomic import atomic_path
from ..metrics import CORRUPTIONS, ece_from_bins
from .kinds import KINDS, PlotSpec, finite, grid

#: Figure resolution; 110 dpi keeps an 11-inch-wide figure readable on GitHub without multi-MB files.
DPI = 110


def _edges(bins: Mapping[str, Any]) -> list[float]:
    n = len(bins["count"])
    return list(bins["edges"]) if bins.get("edges") is not None else [i / n for i in range(n + 1)]


def _sorted_ks(v: Mapping[str, float]) -> tuple[list[int], list[float]]:
    pairs = sorted((int(k), float(a)) for k, a in v.items())
    return [k for k, _ in pairs], [a for _, a in pairs]


def _corruption_order(names: Sequence[str]) -> list[str]:
    known = [c for c in CORRUPTIONS if c in names]
    return known + sorted(n for n in names if n not in CORRUPTIONS)


def _first_seed(r: Any) -> str:
    return str(r.seeds[0]) if r.seeds else "?"


def _first_seed_metric(r: Any, name: str) -> float | None:
    """A metric of the record's first seed: the seed the extras come from (the runner keeps the first seed's)."""
    value = (r.per_seed.get(_first_seed(r)) or {}).get(name)
    return value if finite(value) else None


def draw_reliability(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    rows, cols = grid(len(records))
    gs = fig.add_gridspec(rows * 2, cols, height_ratios=[3, 1] * rows)
    for i, r in enumerate(records):
        bins = r.extras["reliability"]
        edges = _edges(bins)
        left = edges[:-1]
        width = [b - a for a, b in zip(edges[:-1], edges[1:])]
        acc = [a if finite(a) else 0.0 for a in bins["accuracy"]]
        conf = [c if finite(c) else 0.0 for c in bins["confidence"]]
        nonempty = [n > 0 for n in bins["count"]]
        row, col = divmod(i, cols)
        ax = fig.add_subplot(gs[2 * row, col])
        axh = fig.add_subplot(gs[2 * row + 1, col], sharex=ax)
        ax.bar([x for x, m in zip(left, nonempty) if m], [a for a, m in zip(acc, nonempty) if m],
               width=[w for w, m in zip(width, nonempty) if m], align="edge", color="#4C72B0", edgecolor="black",
               linewidth=0.6, label="accuracy")
        # Gap between the bin's accuracy and its mean confidence (over- or under-confidence).
        gap_x = [x for x, m in zip(left, nonempty) if m]
        gap_b = [a for a, m in zip(acc, nonempty) if m]
        gap_h = [c - a for a, c, m in zip(acc, conf, nonempty) if m]
        ax.bar(gap_x, gap_h, bottom=gap_b, width=[w for w, m in zip(width, nonempty) if m], align="edge",
               color="#C44E52", alpha=0.35, edgecolor="#C44E52", hatch="//", linewidth=0.6,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        # The record's own number: the title and the task's table never disagree.
        ece = _first_seed_metric(r, "ece")
        ece = ece_from_bins(bins) if ece is None else ece
        ax.set_title(f"{r.model}\nECE = {100 * ece:.2f}% (seed {_first_seed(r)})", fontsize=10)
        ax.set_ylabel("accuracy")
        ax.tick_params(labelbottom=False)
        total = float(sum(bins["count"]))
        axh.bar(left, [100 * n / total for n in bins["count"]], width=width, align="edge",
                color=colors.get(r.model, "grey"), edgecolor="black", linewidth=0.4)
        axh.set_xlabel("confidence (top-label probability)")
        axh.set_ylabel("samples (%)")
        axh.set_xlim(0, 1)
        if i == 0:
            ax.legend(loc="upper left", fontsize=8, frameon=True)
    fig.suptitle(spec.title, fontsize=11)


def draw_knn(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    all_k: set[int] = set()
    for r in records:
        ks, accs = _sorted_ks(r.extras["top1_by_k"])
        all_k.update(ks)
        ax.plot(ks, [100 * a for a in accs], marker="o", color=colors.get(r.model, "grey"), label=r.model)
    ax.set_xscale("log")
    ticks = sorted(all_k)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k (number of neighbours, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(title="model", fontsize=8, loc="best")
    ax.set_title(spec.title, fontsize=11)


def draw_ood(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    rows, cols = grid(len(records))
    for i, r in enumerate(records):
        h = r.extras["msp_hist"]
        ax = fig.add_subplot(rows, cols, i + 1)
        names = {"id": (r.datasets or {}).get("test"), "ood": (r.datasets or {}).get("ood")}
        for key, color, default in (("id", "#4C72B0", "in-distribution"), ("ood", "#DD8452", "OOD")):
            edges = [float(b) for b in h[key]["edges"]]
            counts = [float(c) for c in h[key]["counts"]]
            total = sum(counts)
            frac = [100 * c / total for c in counts]
            label = f"{default} ({names[key]})" if isinstance(names[key], str) else default
            ax.stairs(frac, edges, fill=True, alpha=0.35, color=color)
            ax.stairs(frac, edges, color=color, linewidth=1.5, label=f"{label}, n = {int(total)}")
        title = f"{r.model} (seed {_first_seed(r)})"
        auroc = _first_seed_metric(r, "auroc")
        if auroc is not None:
            title += f"\nAUROC = {100 * auroc:.2f}%"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("confidence (max softmax probability)")
        ax.set_ylabel("samples (%)")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(spec.title, fontsize=11)


def draw_corruption(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    palette = sns.color_palette("rocket_r", 5)
    axes = fig.subplots(len(records), 1, sharex=True, squeeze=False)[:, 0]
    for ax, r in zip(axes, records):
        ce = r.extras["errors"]
        names = _corruption_order(list(ce))
        n_sev = 5
        width = 0.8 / n_sev
        for s in range(n_sev):
            xs = [j - 0.4 + (s + 0.5) * width for j in range(len(names))]
            ax.bar(xs, [100 * ce[c][s] for c in names], width=width, color=palette[s], label=f"severity {s + 1}")
        clean = _first_seed_metric(r, "clean_error")
        if clean is not None:
            ax.axhline(100 * clean, color="black", linestyle="--", linewidth=1, label="clean error")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([c.replace("_", " ") for c in names], rotation=35, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 error (%)")
        ax.grid(axis="x", visible=False)  # vertical lines would run through the bar groups
        ax.set_title(r.model, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncols=6, fontsize=8, loc="outside lower center")
    fig.suptitle(spec.title, fontsize=11)


def draw_severity(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for r in records:
        ce = r.extras["errors"]
        mean = [100 * sum(e[s] for e in ce.values()) / len(ce) for s in range(5)]
        color = colors.get(r.model, "grey")
        ax.plot(range(1, 6), mean, marker="o", color=color, label=r.model)
        clean = _first_seed_metric(r, "clean_error")
        if clean is not None:
            ax.axhline(100 * clean, color=color, linestyle=":", linewidth=1)
    ax.set_xticks(range(1, 6))
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("top-1 error, mean over corruptions (%)")
    ax.set_ylim(0, 100)
    ax.legend(title="model (dotted: clean error)", fontsize=8, loc="best")
    ax.set_title(spec.title, fontsize=11)


def draw_spectrum(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for r in records:
        s = sorted((float(x) for x in r.extras["spectrum"]), reverse=True)
        top = s[0]
        label = r.model
        er = _first_seed_metric(r, "effective_rank")
        if er is not None:
            label += f" (effective rank {er:.1f}, seed {_first_seed(r)})"
        # Zeros cannot be drawn on a log axis: clip at 1e-12 of the largest value.
        ax.plot(range(1, len(s) + 1), [max(x / top, 1e-12) for x in s], color=colors.get(r.model, "grey"),
                label=label, linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index (sorted)")
    ax.set_ylabel("singular value / largest (log scale)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(spec.title, fontsize=11)


#: Plot kind -> the function that draws it.
DRAWERS: dict[str, Callable[[Figure, Sequence[Any], PlotSpec, Mapping[str, Any]], None]] = {
    "knn_k": draw_knn,
    "reliability": draw_reliability,
    "ood_hist": draw_ood,
    "corruption": draw_corruption,
    "severity": draw_severity,
    "spectrum": draw_spectrum,
}


def model_colors(models: Sequence[str]) -> dict[str, Any]:
    """One colour per model (seaborn's colour-blind palette, by sorted name), the same in every figure of a page."""
    names = sorted(set(models))
    palette = sns.color_palette("colorblind", max(len(names), 1))
    return {m: palette[i % len(palette)] for i, m in enumerate(names)}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """matplotlib defaults + seaborn's whitegrid theme, restored afterwards (a user's matplotlibrc must not change
    the committed figures, and the caller's settings must not change because a figure was drawn)."""
    with mpl.rc_context():
        mpl.rcdefaults()
        sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
        yield


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        # Software metadata carries the matplotlib version; without it the bytes depend only on the drawing.
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _build(spec: PlotSpec, records: Sequence[Any], colors: Mapping[str, Any] | None) -> Figure:
    by_model = {r.model: r for r in records}
    chosen = [by_model[m] for m in spec.models if m in by_model]
    colors = dict(colors) if colors is not None else model_colors([r.model for r in chosen])
    fig = _figure(*KINDS[spec.kind].size(len(chosen)))
    DRAWERS[spec.kind](fig, chosen, spec, colors)
    return fig


def figure(spec: PlotSpec, records: Sequence[Any], colors: Mapping[str, Any] | None = None) -> Figure:
    """The matplotlib Figure of ``spec`` drawn from ``records`` (those of ``spec.models``), not saved."""
    with _style():
        return _build(spec, records, colors)


def draw(spec: PlotSpec, records: Sequence[Any], path: str | os.PathLike,
         colors: Mapping[str, Any] | None = None) -> Path:
    """Draw ``spec`` from ``records`` (those of ``spec.models``) and write the PNG to ``path``; returns it."""
    with _style():
        return _save(_build(spec, records, colors), Path(path))
