"""Drawing the planned figures on matplotlib figures styled by seaborn: the style, the figure, the PNG.

One ``draw_*`` function per plot kind (``draw_probe``, ``draw_ood``, ``draw_corruption``) takes the figure, the
records to draw (those the plan chose), the :class:`PlotSpec` and one colour per model.
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
from .draw_corruption import draw_corruption, draw_severity
from .draw_ood import draw_ood, draw_roc
from .draw_probe import draw_knn, draw_reliability, draw_sigma_error, draw_spectrum
from .kinds import KINDS, PlotSpec

#: Figure resolution; 110 dpi keeps an 11-inch-wide figure readable on GitHub without multi-MB files.
DPI = 110


#: Plot kind -> the function that draws it.
DRAWERS: dict[str, Callable[[Figure, Sequence[Any], PlotSpec, Mapping[str, Any]], None]] = {
    "knn_k": draw_knn,
    "reliability": draw_reliability,
    "sigma_error": draw_sigma_error,
    "ood_hist": draw_ood,
    "ood_roc": draw_roc,
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
