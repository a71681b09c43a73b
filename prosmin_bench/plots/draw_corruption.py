"""Drawing the corruption plots: top-1 error per corruption and severity, and the mean error per severity, each with
the error of a uniform guess (``extras["chance_error"]``) and the reference model that normalises the mCE
(``extras["baseline"]``: AlexNet for ImageNet-C, the suite's pixel tree for digits_c; ``tasks/corruption.py``).
Each ``draw_*`` takes the figure, the records of the plan, the :class:`PlotSpec` and one colour per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import seaborn as sns
from matplotlib.lines import Line2D

from ..metrics import CORRUPTIONS
from ._common import first_seed_metric, legend_outside
from .kinds import PlotSpec, finite

SEVERITIES = 5
CHANCE = {"color": "#555555", "linestyle": "-.", "linewidth": 1.2}
REFERENCE = {"color": "black", "marker": "_", "linestyle": "none", "markersize": 8, "markeredgewidth": 1.6}


def _corruption_order(names: Sequence[str]) -> list[str]:
    known = [c for c in CORRUPTIONS if c in names]
    return known + sorted(n for n in names if n not in CORRUPTIONS)


def chance_error(r: Any) -> float | None:
    """The record's error of a uniform guess, 1 - 1/C (None for records made before it was stored)."""
    value = r.extras.get("chance_error")
    return float(value) if finite(value) and 0 < value < 1 else None


def reference(r: Any) -> tuple[str, dict[str, list[float]]] | None:
    """(name, {corruption: [5 errors]}) of the model the record's mCE is normalised by, None when absent."""
    base = r.extras.get("baseline")
    if not isinstance(base, Mapping) or not isinstance(base.get("errors"), Mapping):
        return None
    errors = base["errors"]
    if not all(isinstance(e, list) and len(e) == SEVERITIES and all(finite(x) for x in e) for e in errors.values()):
        return None
    return str(base.get("name", "reference model")), {c: [float(x) for x in e] for c, e in errors.items()}


def draw_corruption(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    palette = sns.color_palette("rocket_r", SEVERITIES)
    axes = fig.subplots(len(records), 1, sharex=True, squeeze=False)[:, 0]
    handles: dict[str, Any] = {}
    for ax, r in zip(axes, records):
        ce = r.extras["errors"]
        names = _corruption_order(list(ce))
        width = 0.8 / SEVERITIES
        ref = reference(r)
        for s in range(SEVERITIES):
            xs = [j - 0.4 + (s + 0.5) * width for j in range(len(names))]
            bars = ax.bar(xs, [100 * ce[c][s] for c in names], width=width, color=palette[s])
            handles[f"severity {s + 1}"] = bars
            if ref is not None:
                at = [(x, 100 * ref[1][c][s]) for x, c in zip(xs, names) if c in ref[1]]
                (mark,) = ax.plot([x for x, _ in at], [y for _, y in at], **REFERENCE)
                handles[f"reference model (the mCE's denominator): {ref[0]}"] = mark
        clean = first_seed_metric(r, "clean_error")
        if clean is not None:
            handles["clean error"] = ax.axhline(100 * clean, color="black", linestyle="--", linewidth=1)
        chance = chance_error(r)
        if chance is not None:
            handles[f"chance (uniform guess, 1 - 1/C = {100 * chance:.0f}%)"] = ax.axhline(100 * chance, **CHANCE)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([c.replace("_", " ") for c in names], rotation=35, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 error (%)")
        ax.grid(axis="x", visible=False)  # vertical lines would run through the bar groups
        ax.set_title(r.model, fontsize=10)
    order = [k for k in handles if k.startswith("severity")] + [k for k in handles if not k.startswith("severity")]
    legend_outside(fig, [handles[k] for k in order], order, where="lower center", ncols=4)
    fig.suptitle(spec.title, fontsize=11)


def draw_severity(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    sev = range(1, SEVERITIES + 1)
    handles, labels = [], []
    for r in records:
        ce = r.extras["errors"]
        mean = [100 * sum(e[s] for e in ce.values()) / len(ce) for s in range(SEVERITIES)]
        color = colors.get(r.model, "grey")
        handles += ax.plot(sev, mean, marker="o", color=color, label=r.model)
        labels.append(r.model)
        clean = first_seed_metric(r, "clean_error")
        if clean is not None:
            ax.axhline(100 * clean, color=color, linestyle=":", linewidth=1)
    drawn: set[tuple[str, tuple[float, ...]]] = set()
    for r in records:  # one line per distinct reference (every record of a task normally has the same one)
        ref = reference(r)
        if ref is None:
            continue
        mean = tuple(100 * sum(e[s] for e in ref[1].values()) / len(ref[1]) for s in range(SEVERITIES))
        if (ref[0], mean) not in drawn:
            drawn.add((ref[0], mean))
            handles += ax.plot(sev, mean, color="black", linestyle="--", marker="s", markersize=4)
            labels.append(f"reference model (mCE denominator):\n{ref[0]}")
    chances = sorted({c for c in (chance_error(r) for r in records) if c is not None})
    for c in chances:
        handles.append(ax.axhline(100 * c, **CHANCE))
        labels.append(f"chance (uniform guess, 1 - 1/C = {100 * c:.0f}%)")
    handles.append(Line2D([], [], color="grey", linestyle=":", linewidth=1))
    labels.append("clean error (model's colour)")
    ax.set_xticks(list(sev))
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("top-1 error, mean over corruptions (%)")
    ax.set_ylim(0, 100)
    legend_outside(fig, handles, labels)
    ax.set_title(spec.title, fontsize=11)
