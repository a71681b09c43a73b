"""Choosing a probe's hyper-parameter on held-out data, with a grid that never ends on the choice.

The linear probe's learning rate (``tasks/probes.py``) and the low-shot lambda (``tasks/lowshot.py``) are chosen
on a held-out part of the training data (never the test set) by :func:`select_on_grid`:

1. Every value of the card's grid is evaluated; the score is the held-out (top-1, -NLL), compared as a tuple (top-1
   first, NLL breaks ties), higher is better. A point whose score is not finite (a diverged head) loses to every
   finite one.
2. Ties: the first value evaluated wins (the card's grid order, then the extension points in the order they were
   added), so an extension point replaces the edge only when it is strictly better. A plateau of exactly equal
   held-out scores therefore stops after one extension step with an interior choice.
3. While the best value is the smallest (largest) of those evaluated, the grid grows on that side by one
   log-spaced point: the edge value divided (multiplied) by the ratio of the two outermost values on that side,
   clamped to the documented hard bound. When the edge already is the bound, the search stops and the choice is
   recorded with ``edge = True``. A score that keeps improving towards an edge (a plateau of top-1 with the NLL
   still falling, e.g. lambda -> 0 on separable data) thus runs into the bound, never on forever; at most
   :data:`MAX_EXTENSION` points are added per side besides (a ratio close to 1 would otherwise crawl).
4. A grid of one value is a fixed choice: it is evaluated (the held-out score and the temperature need the
   fit-part model) but not extended, and ``edge`` is False: there is no selection to be on the edge of.

The record's ``extras["selection"]`` per seed is ``{hparam: {"grid": every value evaluated, sorted; "chosen": the
value; "edge": bool}}`` (:meth:`Selection.as_extras`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Most points added on one side of a grid (with a ratio of 3 that spans 3^20 ~ 3.5e9, more than any bound here).
MAX_EXTENSION = 20


@dataclass(frozen=True)
class Score:
    """The held-out score of one grid value: top-1 accuracy and mean NLL (nats); higher top-1, then lower NLL."""

    top1: float
    nll: float

    @property
    def key(self) -> tuple[float, float]:
        """Sort key, larger is better; a non-finite score sorts below every finite one."""
        if not (math.isfinite(self.top1) and math.isfinite(self.nll)):
            return (-math.inf, -math.inf)
        return (self.top1, -self.nll)


def logits_score(logits: np.ndarray, labels: np.ndarray) -> Score:
    """The held-out :class:`Score` of a head's logits [N, C] (float64) on labels [N]: top-1 and mean cross-entropy.
    A head with any non-finite logit diverged and scores NaN (below every finite score); no held-out rows score
    (0, 0)."""
    if not len(labels):
        return Score(0.0, 0.0)
    if not np.all(np.isfinite(logits)):
        return Score(float("nan"), float("nan"))
    nll = float(F.cross_entropy(torch.from_numpy(logits), torch.as_tensor(labels, dtype=torch.long)).item())
    return Score(float((logits.argmax(1) == labels).mean()), nll)


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_on_grid`: every value evaluated with its score (in evaluation order), the
    chosen value and whether it is still on the edge of the evaluated grid (a hard bound or MAX_EXTENSION hit)."""

    scores: dict[float, Score]
    chosen: float
    edge: bool

    @property
    def grid(self) -> list[float]:
        return sorted(self.scores)

    def score_table(self, name: Callable[[float], str] = lambda v: f"{v:g}") -> dict[str, dict[str, float]]:
        """``{name(value): {"top1": ..., "nll": ...}}`` over the evaluated values in ascending order, the record's
        ``extras["val_scores"]``."""
        return {name(v): {"top1": sc.top1, "nll": sc.nll} for v, sc in sorted(self.scores.items())}

    def as_extras(self) -> dict[str, object]:
        """``{"grid": [...], "chosen": value, "edge": bool}``, the per-seed ``extras["selection"][hparam]``."""
        return {"grid": [float(v) for v in self.grid], "chosen": float(self.chosen), "edge": bool(self.edge)}


def _best(scores: dict[float, Score]) -> float:
    """The value with the largest score key; the first evaluated wins ties (dicts keep insertion order)."""
    best_value, best_key = None, None
    for value, score in scores.items():
        if best_key is None or score.key > best_key:
            best_value, best_key = value, score.key
    assert best_value is not None
    return best_value


def select_on_grid(grid: Sequence[float], evaluate: Callable[[float], Score], bounds: tuple[float, float],
                   *, max_extension: int = MAX_EXTENSION) -> Selection:
    """Evaluate ``grid`` (positive values, in the given order) with ``evaluate(value) -> Score`` and extend it
    log-spaced past whichever edge is chosen, up to ``bounds = (low, high)`` (see the module docstring).

    >>> sel = select_on_grid([1.0, 3.0], lambda v: Score(1.0, abs(math.log(v / 30.0))), (0.1, 1000.0))
    >>> [round(v) for v in sel.grid], round(sel.chosen), sel.edge
    ([1, 3, 9, 27, 81], 27, False)
    >>> sel = select_on_grid([1.0, 3.0], lambda v: Score(1.0, 1.0 / v), (0.1, 20.0))
    >>> [round(v) for v in sel.grid], sel.chosen, sel.edge
    ([1, 3, 9, 20], 20.0, True)
    """
    low, high = bounds
    if not grid or any(not (v > 0 and math.isfinite(v)) for v in grid):
        raise ValueError(f"Expected a grid of positive finite values, but got {list(grid)}")
    if not 0 < low <= min(grid) or not max(grid) <= high:
        raise ValueError(f"Expected the grid {list(grid)} to lie within the bounds {bounds}")
    scores: dict[float, Score] = {}
    for value in grid:
        if value not in scores:
            scores[float(value)] = evaluate(float(value))
    added = {"low": 0, "high": 0}
    while True:
        chosen = _best(scores)
        values = sorted(scores)
        if len(values) < 2:
            return Selection(scores, chosen, False)
        if chosen == values[0]:
            side, edge_value = "low", values[0]
            if edge_value <= low or added[side] >= max_extension:
                return Selection(scores, chosen, True)
            new = max(edge_value / (values[1] / values[0]), low)
        elif chosen == values[-1]:
            side, edge_value = "high", values[-1]
            if edge_value >= high or added[side] >= max_extension:
                return Selection(scores, chosen, True)
            new = min(edge_value * (values[-1] / values[-2]), high)
        else:
            return Selection(scores, chosen, False)
        added[side] += 1
        new = float(f"{new:.12g}")  # 0.81, not 0.8100000000000002, in records; still strictly past the edge
        scores[new] = evaluate(new)


def check_bounds(card: str, grid_field: str, grid: Sequence[float], bounds_field: str,
                 bounds: Sequence[float]) -> None:
    """CardError unless ``bounds`` is (low, high) with 0 < low < high and every value of ``grid`` lies inside."""
    from ..errors import CardError

    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds) \
            or not 0 < bounds[0] < bounds[1]:
        raise CardError(f"Card {card!r}: protocol field {bounds_field!r} must be [low, high] with 0 < low < high, "
                        f"got {list(bounds)}")
    outside = [v for v in grid if not bounds[0] <= v <= bounds[1]]
    if outside:
        raise CardError(f"Card {card!r}: protocol field {grid_field!r} has {outside} outside {bounds_field} "
                        f"{list(bounds)}; widen {bounds_field!r} or change the grid")
