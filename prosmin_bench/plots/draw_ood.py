"""Drawing the OOD plots: ID-vs-OOD confidence histograms (seaborn's ``histplot`` with a weighted KDE) and the ROC
curves of every OOD score. Each ``draw_*`` takes the figure, the records of the plan, the :class:`PlotSpec` and one
colour per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ._common import LEGEND_FONTSIZE, first_seed, first_seed_metric, legend_outside
from .kinds import PlotSpec, grid

ID_COLOR, OOD_COLOR = "#4C72B0", "#DD8452"
#: A weighted KDE over the bin centres is drawn only where it can follow the histogram: each set with at least
#: ``KDE_MIN_BINS`` non-empty bins and no bin holding more than ``KDE_MAX_SHARE`` of its samples. Mass piled in
#: one bin (MSP near 1 for most ID images) is a spike at the edge that any kernel would smear into a low hump.
KDE_MIN_BINS = 4
KDE_MAX_SHARE = 0.25
#: The OOD scores in the order of ``tasks/ood.py`` (logit-based, feature-based, then ProSMin's predictive ones);
#: any other score follows, sorted.
SCORE_ORDER = ("msp", "maxlogit", "energy", "knn", "sigma", "dispersion")
SCORE_NAMES = {"msp": "MSP", "maxlogit": "max logit", "energy": "energy", "knn": "k-NN distance",
               "sigma": "mean sigma", "dispersion": "dispersion"}


def kde_fits(counts: Sequence[float]) -> bool:
    """Whether a weighted KDE over these bin counts can follow the histogram (``KDE_MIN_BINS``, ``KDE_MAX_SHARE``)."""
    total = float(sum(counts))
    return total > 0 and sum(c > 0 for c in counts) >= KDE_MIN_BINS and max(counts) <= KDE_MAX_SHARE * total


def _set_label(r: Any, key: str) -> str:
    name = (r.datasets or {}).get("test" if key == "id" else "ood")
    default = "in-distribution" if key == "id" else "OOD"
    n = int(sum(r.extras["msp_hist"][key]["counts"]))
    return (f"{default} ({name})" if isinstance(name, str) else default) + f", n = {n}"


def draw_ood(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    rows, cols = grid(len(records))
    any_kde = False
    for i, r in enumerate(records):
        h = r.extras["msp_hist"]
        ax = fig.add_subplot(rows, cols, i + 1)
        kde = all(kde_fits(h[key]["counts"]) for key in ("id", "ood"))
        any_kde |= kde
        # One call per set, each summing to 100% on its own (the sets differ in size); ID filled, OOD an outline
        # drawn over it, so no colour is a blend of the two.
        for key, color, fill in (("id", ID_COLOR, True), ("ood", OOD_COLOR, False)):
            edges = [float(e) for e in h[key]["edges"]]
            centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
            sns.histplot(x=centres, weights=[float(c) for c in h[key]["counts"]], bins=edges, stat="percent",
                         element="step", fill=fill, alpha=0.35 if fill else 1.0, color=color,
                         linewidth=1.2 if fill else 2.0,
                         kde=kde, kde_kws={"clip": (edges[0], edges[-1])},
                         line_kws={"linewidth": 1.0, "linestyle": "--"}, label=_set_label(r, key), ax=ax)
        title = f"{r.model} (seed {first_seed(r)})"
        auroc = first_seed_metric(r, "auroc")
        if auroc is not None:
            title += f"\nMSP AUROC = {100 * auroc:.2f}%"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("confidence (max softmax probability)")
        ax.set_ylabel("samples (%)")
    handles = [Patch(facecolor=ID_COLOR, alpha=0.5, edgecolor=ID_COLOR), Line2D([], [], color=OOD_COLOR, linewidth=2)]
    labels = [_set_label(records[0], "id"), _set_label(records[0], "ood")]
    if any_kde:
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1.0))
        labels.append("dashed, in the set's colour: weighted KDE over the bin centres")
    legend_outside(fig, handles, labels, where="lower center", ncols=3)
    pooled = " (open-set: the splits' images pooled)" if any("open_set" in r.extras for r in records) else ""
    fig.suptitle(spec.title + pooled, fontsize=11)


def score_order(names: Sequence[str]) -> list[str]:
    """The scores of a ``roc`` extras in ``SCORE_ORDER``, unknown ones last (sorted)."""
    return [s for s in SCORE_ORDER if s in names] + sorted(s for s in names if s not in SCORE_ORDER)


def score_colors() -> dict[str, Any]:
    """One colour per known score, the same in every panel and figure (ColorBrewer's Dark2: not the models'
    palette, so a score's colour is never read as a model's)."""
    return dict(zip(SCORE_ORDER, sns.color_palette("Dark2", len(SCORE_ORDER))))


def draw_roc(fig: Any, records: Sequence[Any], spec: PlotSpec, colors: Mapping[str, Any]) -> None:
    rows, cols = grid(len(records))
    palette = score_colors()
    extra = sns.color_palette("Set2", 8)
    for i, r in enumerate(records):
        roc = r.extras["roc"]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUROC 50%)")
        for j, score in enumerate(score_order(list(roc))):
            fpr, tpr = roc[score]["fpr"], roc[score]["tpr"]
            # The record's own AUROC of the first seed (the task's table); the curve's area where it has none.
            auroc = first_seed_metric(r, "auroc" if score == "msp" else f"{score}_auroc")
            auroc = float(np.trapezoid(tpr, fpr)) if auroc is None else auroc
            predictive = score in ("sigma", "dispersion")
            ax.plot(fpr, tpr, color=palette.get(score, extra[j % len(extra)]), linewidth=2.0 if predictive else 1.4,
                    linestyle="-." if predictive else "-",
                    label=f"{SCORE_NAMES.get(score, score)}: {100 * auroc:.1f}%")
        # A margin, so a curve along an edge (a perfect or a useless score) is not hidden under the frame.
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("FPR (ID images flagged as OOD)")
        ax.set_ylabel("TPR (OOD images flagged)")
        ax.set_title(f"{r.model} (seed {first_seed(r)})", fontsize=10)
        # Below the panel, where no curve can be; the AUROCs are the legend's.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=LEGEND_FONTSIZE - 1,
                  frameon=False, title="score: AUROC", title_fontsize=LEGEND_FONTSIZE - 1, handlelength=1.6,
                  columnspacing=0.8)
    mean = " (open-set: mean of the splits' curves)" if any("open_set" in r.extras for r in records) else ""
    fig.suptitle(spec.title + mean, fontsize=11)
