"""Helpers of the ``draw_*`` modules: the first seed's numbers (the seed the extras come from) and legends placed
outside the axes, where they cannot cover data (``Figure.legend(loc="outside ...")`` needs the constrained layout
that ``drawing`` gives every figure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .kinds import finite

#: Legend font size (points) under seaborn's "notebook" context at font_scale 0.85.
LEGEND_FONTSIZE = 8


def first_seed(r: Any) -> str:
    """The record's first seed as stored in ``per_seed`` ("?" for a record without seeds)."""
    return str(r.seeds[0]) if r.seeds else "?"


def first_seed_metric(r: Any, name: str) -> float | None:
    """A metric of the record's first seed: the seed the extras come from (the runner keeps the first seed's)."""
    value = (r.per_seed.get(first_seed(r)) or {}).get(name)
    return value if finite(value) else None


def legend_outside(fig: Any, handles: Sequence[Any], labels: Sequence[str], where: str = "right upper",
                   ncols: int = 1, title: str | None = None) -> Any:
    """One legend for the whole figure, outside the axes (``where``: "right upper", "lower center", ...)."""
    return fig.legend(handles, labels, loc=f"outside {where}", ncols=ncols, fontsize=LEGEND_FONTSIZE, title=title,
                      title_fontsize=LEGEND_FONTSIZE, frameon=False)
