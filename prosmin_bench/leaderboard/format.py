"""How a page shows things: numbers in a column's unit, mean ± std, headers with the better direction, model marks
and markdown tables. The facts behind units and directions come from ``prosmin_bench.metrics.metric_info``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from tabulate import tabulate

from ..metrics import metric_info
from ..metrics.info import FRACTION, PERCENT

MARK_EVAL = "‡"
MARK_TRAIN = "†"
MARK_SAME = "≈"
MARK_EDGE = "§"
MARK_DEVIATES = "¶"
REFERENCE = "(reference)"
NOT_RANKED = "(not ranked)"
LEGEND = (f"{MARK_EVAL}: pretrained on data the task evaluates on (not comparable). {MARK_TRAIN}: pretrained on "
          "another split (the train split) of an evaluation dataset, without labels: the standard self-supervised "
          "protocol. **Bold**: the best learned model of a ranked task. "
          f"{MARK_SAME}: not significantly different from the best: the 95% interval of the difference in the main "
          "score from a paired bootstrap (1,000 replicates, each resampling the same test images for both models "
          "and each model's seeds) contains 0; a score without a mark is significantly worse, except for the "
          "models a task's section lists as not compared (records without per-image values, or evaluated on "
          f"other test data). {MARK_EDGE}: the hyper-parameter chosen on held-out data is on the edge of its search "
          f"grid for at least one seed (the score may be held back by the grid). {REFERENCE}: a non-learned "
          "reference (e.g. `pixels`, the raw normalised pixels as features), listed under the learned models to "
          f"place the numbers; never ranked, best or compared. {NOT_RANKED}: a diagnostic task, shown but not "
          "counted in the mean rank and without significance marks. `(variant of M)`: the same weights as model M "
          "evaluated another way (e.g. through another network of its pretraining checkpoint), listed beside M and, "
          "like a reference, never ranked, best or compared; ProSMin checkpoints are evaluated through their online "
          "encoder, as the paper's Sec. 6 says, unless a row is marked as the target-network variant. "
          f"{MARK_DEVIATES} after a task: its protocol differs from the one behind the numbers papers report for it; "
          "the task's section lists each difference (the card's `deviations`).")


def finite(x: Any) -> bool:
    """True for a real, finite number (not a bool, not NaN or infinite)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(value: float | None, unit: str = "raw") -> str:
    """A number in a column's unit: ``"rate"`` (a fraction, shown x 100 with 2 decimals), ``"percent"`` (already in
    percent, 2 decimals) or ``"raw"`` (3 decimals); an em dash when missing or not finite.

    >>> fmt(0.48611, "rate"), fmt(66.5, "percent"), fmt(2.31678), fmt(float("nan"), "rate")
    ('48.61', '66.50', '2.317', '—')
    """
    if not finite(value):
        return "—"
    if unit == "rate":
        return f"{100 * value:.2f}"
    return f"{value:.2f}" if unit == "percent" else f"{value:.3f}"


def fmt_mean_std(mean: float | None, std: float | None, n_seeds: int, unit: str = "raw") -> str:
    """``mean ± std`` over seeds (the std is shown whenever there are two seeds or more, even when it is 0).

    >>> fmt_mean_std(0.5153, 0.0255, 2, "rate"), fmt_mean_std(0.5153, 0.0, 1, "rate")
    ('51.53 ± 2.55', '51.53')
    """
    text = fmt(mean, unit)
    if n_seeds > 1 and finite(mean) and finite(std):
        text += f" ± {fmt(std, unit)}"
    return text


def fmt_ci(ci: Any, unit: str = "raw") -> str:
    """A 95% interval ``[low, high]`` in a column's unit; an em dash when the record has none.

    >>> fmt_ci([0.7694, 0.8333], "rate"), fmt_ci(None)
    ('[76.94, 83.33]', '—')
    """
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(v) for v in ci)):
        return "—"
    return f"[{fmt(ci[0], unit)}, {fmt(ci[1], unit)}]"


def marked(text: str, status: str) -> str:
    """A main-score cell with its significance mark: bold for the best, ``≈`` when not significantly different.

    >>> marked("80.28", "best"), marked("79.10", "same"), marked("60.00", "worse")
    ('**80.28**', '79.10 ≈', '60.00')
    """
    if text == "—":
        return text
    return f"**{text}**" if status == "best" else f"{text} {MARK_SAME}" if status == "same" else text


def natural_key(name: str) -> list[Any]:
    """Sort key that orders the numbers inside names by value (``top1_k10`` before ``top1_k100``)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def arrow(metric: str) -> str:
    """``↑`` or ``↓`` for the better direction; "" for a value the protocol chose or counted (``lr``)."""
    info = metric_info(metric)
    if not info.score:
        return ""
    return "↑" if info.higher_is_better else "↓"


def column_unit(metric: str, values: Iterable[float]) -> str:
    """How a column is shown: ``"rate"`` (x 100) when the metric is a rate and every value of the column is a
    fraction in [0, 1], ``"percent"`` for metrics recorded in percent (mCE), else ``"raw"``.

    >>> column_unit("top1", [0.5, 1.0]), column_unit("top1", [75.0]), column_unit("mce", [66.1])
    ('rate', 'raw', 'percent')
    """
    unit = metric_info(metric).unit
    if unit == FRACTION and all(0.0 <= v <= 1.0 for v in values if finite(v)):
        return "rate"
    return "percent" if unit == PERCENT else "raw"


def header(metric: str, unit: str) -> str:
    return f"{metric}{' (%)' if unit in ('rate', 'percent') else ''} {arrow(metric)}".rstrip()


def cell(text: str) -> str:
    # A pipe would end the markdown table cell.
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[list[str]], headers: list[str]) -> str:
    return tabulate([[cell(c) for c in r] for r in rows], [cell(h) for h in headers], tablefmt="github",
                    disable_numparse=True)


def ref_text(ref: Any) -> str:
    """A dataset reference as text: a name as is, a source table as sorted JSON."""
    if isinstance(ref, str):
        return ref
    return json.dumps(ref, sort_keys=True)


def model_cell(model: str, overlap: str, *, reference: bool = False, edge: bool = False, variant_of: str | None = None,
               network: str | None = None) -> str:
    """The model's name with the mark of its pretraining overlap (``"eval"``, ``"train"`` or ``""``), ``(reference)``
    for a reference row, ``(variant of M[, <network> network])`` for a variant of model M, and ``§`` for a
    hyper-parameter chosen on the edge of its grid.

    >>> model_cell("prosmin_target_micro", "train", variant_of="prosmin_micro", network="target")
    'prosmin_target_micro † (variant of prosmin_micro, target network)'
    """
    text = model + {"eval": f" {MARK_EVAL}", "train": f" {MARK_TRAIN}", "": ""}[overlap]
    if variant_of:
        text += f" (variant of {variant_of}{f', {network} network' if network else ''})"
    return text + (f" {REFERENCE}" if reference else "") + (f" {MARK_EDGE}" if edge else "")


def task_mark(deviations: Any) -> str:
    """`` ¶`` after a task whose card lists deviations from the paper's protocol, else ""."""
    return f" {MARK_DEVIATES}" if deviations else ""


def on_grid_edge(extras: Any) -> bool:
    """True when a record's ``extras["selection"]`` has a choice on the edge of its grid for some seed
    (``{hparam: {"grid": [...], "chosen": [...], "edge": [bool per seed] or bool}}``)."""
    selection = extras.get("selection") if isinstance(extras, dict) else None
    if not isinstance(selection, dict):
        return False
    for entry in selection.values():
        edge = entry.get("edge") if isinstance(entry, dict) else None
        if edge is True or (isinstance(edge, list) and any(e is True for e in edge)):
            return True
    return False
