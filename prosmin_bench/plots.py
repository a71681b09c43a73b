"""Leaderboard plots (PNG) drawn from the ``extras`` of result records: a pure function of the records.

Each plot kind reads one key of ``ResultRecord.extras`` (the runner keeps the extras of the first seed). A task
kind that wants a plot only has to put the key in its ``TaskOutput.extras``; records without the key, or with a
malformed value, are left out of the plot (logged), and a plot with no usable record is not drawn. Expected keys:

``reliability`` (linear, low-shot, ... any classifier)
    ``{"confidence": [B], "accuracy": [B], "count": [B]}``: per equal-width bin of top-label confidence, the mean
    confidence, the accuracy (NaN for an empty bin) and the number of samples; optional ``"edges": [B + 1]``
    (default: B equal-width bins on [0, 1]). ``prosmin_bench.metrics.reliability_bins`` returns this layout.
``top1_by_k`` (knn)
    ``{"10": 0.71, "20": 0.73, ...}``: top-1 accuracy (fraction) for each k (keys are str(k)).
``msp_hist`` (ood)
    ``{"id": {"edges": [B + 1], "counts": [B]}, "ood": {"edges": [B + 1], "counts": [B]}}``: histograms of the
    confidence (max softmax probability) of in-distribution and OOD samples; extra keys (e.g. ``"quantiles"``)
    are ignored. The legend names the record's ``test`` and ``ood`` datasets; the panel title shows the
    record's ``auroc`` for that seed.
``errors`` (corruption)
    ``{corruption: [5 top-1 errors, severity 1..5], ...}`` as fractions in [0, 1], drawn in ImageNet-C's
    canonical order; the record's ``clean_error`` metric for that seed, when present, is drawn as a reference line.
``spectrum`` (collapse)
    ``[D]`` singular values of the centred embedding matrix (any scale, any order: drawn sorted, divided by the
    largest); the legend shows the record's ``effective_rank`` for that seed.

Determinism: no randomness (no bootstrapped intervals), matplotlib's default style reset inside an
``rc_context`` (a user's matplotlibrc does not leak in), fixed size and dpi, and the PNG ``Software`` metadata
removed, so the same records give the same bytes with the same matplotlib and fonts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Figure resolution; 110 dpi keeps an 11-inch-wide figure readable on GitHub without multi-MB files.
DPI = 110
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


def _finite(x: Any) -> bool:
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
    if not all(_number_or_nan(x) for x in conf + acc) or not all(_finite(c) and c >= 0 for c in cnt):
        return False
    if sum(cnt) <= 0:
        return False
    edges = v.get("edges")
    return edges is None or (isinstance(edges, list) and len(edges) == len(cnt) + 1 and all(_finite(e) for e in edges))


def _valid_top1_by_k(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v:
        return False
    try:
        return all(int(k) >= 1 and _finite(a) for k, a in v.items())
    except (TypeError, ValueError):
        return False


def _valid_hist(h: Any) -> bool:
    if not isinstance(h, Mapping) or not isinstance(h.get("edges"), list) or not isinstance(h.get("counts"), list):
        return False
    e, c = h["edges"], h["counts"]
    return len(e) == len(c) + 1 and len(c) > 0 and all(_finite(x) for x in e + c) and sum(c) > 0


def _valid_msp_hist(v: Any) -> bool:
    return isinstance(v, Mapping) and _valid_hist(v.get("id")) and _valid_hist(v.get("ood"))


def _valid_corruption_errors(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v:
        return False
    return all(isinstance(e, list) and len(e) == 5 and all(_finite(x) for x in e) for e in v.values())


def _valid_spectrum(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_finite(x) and x >= 0 for x in v) and max(v) > 0


# ---------------------------------------------------------------------------------------------- computations
def reliability_ece(bins: Mapping[str, Sequence[float]]) -> float:
    """ECE from reliability bins: sum_b (n_b / N) |acc_b - conf_b| (Guo et al. 2017, Eq. 3); empty bins skipped.

    >>> reliability_ece({"confidence": [0.6, 0.9], "accuracy": [0.5, 1.0], "count": [1, 3]})
    0.1
    """
    total = float(sum(bins["count"]))
    ece = 0.0
    for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]):
        if n > 0:
            ece += n / total * abs(a - c)
    return round(ece, 12)


def _edges(bins: Mapping[str, Any]) -> list[float]:
    n = len(bins["count"])
    return list(bins["edges"]) if bins.get("edges") is not None else [i / n for i in range(n + 1)]


def _sorted_ks(v: Mapping[str, float]) -> tuple[list[int], list[float]]:
    pairs = sorted((int(k), float(a)) for k, a in v.items())
    return [k for k, _ in pairs], [a for _, a in pairs]


def _corruption_order(names: Sequence[str]) -> list[str]:
    from .metrics import CORRUPTIONS

    known = [c for c in CORRUPTIONS if c in names]
    return known + sorted(n for n in names if n not in CORRUPTIONS)


# ---------------------------------------------------------------------------------------------- figure helpers
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # Software metadata carries the matplotlib version; without it the bytes depend only on the drawing.
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    os.replace(tmp, path)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, PANELS_PER_ROW)
    return math.ceil(n / cols), cols


def _first_seed(r: Any) -> str:
    return str(r.seeds[0]) if r.seeds else "?"


def _first_seed_metric(r: Any, name: str) -> float | None:
    """A metric of the record's first seed: the seed the extras come from (the runner keeps the first seed's)."""
    value = (r.per_seed.get(_first_seed(r)) or {}).get(name)
    return value if _finite(value) else None


def _draw_reliability(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    rows, cols = _grid(len(records))
    gs = fig.add_gridspec(rows * 2, cols, height_ratios=[3, 1] * rows)
    for i, r in enumerate(records):
        bins = r.extras["reliability"]
        edges = _edges(bins)
        left = edges[:-1]
        width = [b - a for a, b in zip(edges[:-1], edges[1:])]
        acc = [a if _finite(a) else 0.0 for a in bins["accuracy"]]
        conf = [c if _finite(c) else 0.0 for c in bins["confidence"]]
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
        ax.set_title(f"{r.model}\nECE = {100 * reliability_ece(bins):.2f}% (seed {_first_seed(r)})", fontsize=10)
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


def _draw_knn(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
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


def _draw_ood(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    rows, cols = _grid(len(records))
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


def _draw_corruption(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    import seaborn as sns

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


def _draw_severity(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
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


def _draw_spectrum(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
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


@dataclass(frozen=True)
class PlotKind:
    """A plot kind: the extras key it reads, how to check it, how to draw it, and its figure size."""

    name: str
    extras_key: str
    valid: Callable[[Any], bool]
    draw: Callable[..., None]
    caption: str
    size: Callable[[int], tuple[float, float]]  # number of models -> (width, height) in inches


def _small_multiples(per_row_height: float) -> Callable[[int], tuple[float, float]]:
    def size(n: int) -> tuple[float, float]:
        rows, cols = _grid(n)
        return max(3.6 * cols, 6.5), per_row_height * rows + 0.7

    return size


#: Plot kinds in the order they appear in a task section.
PLOT_KINDS: tuple[PlotKind, ...] = (
    PlotKind("knn_k", "top1_by_k", _valid_top1_by_k, _draw_knn, "k-NN top-1 accuracy vs k",
             lambda n: (6.5, 4.2)),
    PlotKind("reliability", "reliability", _valid_reliability, _draw_reliability, "reliability diagrams",
             _small_multiples(4.4)),
    PlotKind("ood_hist", "msp_hist", _valid_msp_hist, _draw_ood, "confidence histograms, ID vs OOD",
             _small_multiples(3.4)),
    PlotKind("corruption", "errors", _valid_corruption_errors, _draw_corruption,
             "top-1 error per corruption and severity", lambda n: (11.0, 2.9 * n + 1.3)),
    PlotKind("severity", "errors", _valid_corruption_errors, _draw_severity,
             "top-1 error vs corruption severity", lambda n: (6.5, 4.2)),
    PlotKind("spectrum", "spectrum", _valid_spectrum, _draw_spectrum,
             "singular values of the embeddings", lambda n: (6.5, 4.2)),
)
_KINDS = {k.name: k for k in PLOT_KINDS}


def plan(records: Sequence[Any]) -> list[PlotSpec]:
    """The figures for the records of one task version (one per plot kind with at least one usable record).

    ``records``: ResultRecords of a single task and version. Records whose extras lack a kind's key or hold a
    malformed value are left out of that figure.
    """
    if not records:
        return []
    task, version = records[0].task, records[0].task_version
    specs = []
    for kind in PLOT_KINDS:
        models = []
        for r in sorted(records, key=lambda r: r.model):
            value = r.extras.get(kind.extras_key) if isinstance(r.extras, Mapping) else None
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


def model_colors(models: Sequence[str]) -> dict[str, Any]:
    """One colour per model (seaborn's colour-blind palette, by sorted name), the same in every figure of a page."""
    import seaborn as sns

    names = sorted(set(models))
    palette = sns.color_palette("colorblind", max(len(names), 1))
    return {m: palette[i % len(palette)] for i, m in enumerate(names)}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """matplotlib defaults + seaborn's whitegrid theme, restored afterwards (a user's matplotlibrc must not change
    the committed figures, and the caller's settings must not change because a figure was drawn)."""
    import matplotlib as mpl
    import seaborn as sns

    with mpl.rc_context():
        mpl.rcdefaults()
        sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
        yield


def _build(spec: PlotSpec, records: Sequence[Any], colors: Mapping[str, Any] | None) -> Any:
    kind = _KINDS[spec.kind]
    by_model = {r.model: r for r in records}
    chosen = [by_model[m] for m in spec.models if m in by_model]
    colors = dict(colors) if colors is not None else model_colors([r.model for r in chosen])
    fig = _figure(*kind.size(len(chosen)))
    kind.draw(fig, chosen, spec, colors)
    return fig


def figure(spec: PlotSpec, records: Sequence[Any], colors: Mapping[str, Any] | None = None) -> Any:
    """The matplotlib Figure of ``spec`` drawn from ``records`` (those of ``spec.models``), not saved."""
    with _style():
        return _build(spec, records, colors)


def draw(spec: PlotSpec, records: Sequence[Any], path: str | os.PathLike,
         colors: Mapping[str, Any] | None = None) -> Path:
    """Draw ``spec`` from ``records`` (those of ``spec.models``) and write the PNG to ``path``; returns it."""
    with _style():
        return _save(_build(spec, records, colors), Path(path))
