"""What ``prosmin-bench run`` prints: a compact table of the (model, task) pairs of that run, not the whole page.

One row per record the run returned, in the run's order: model, ``task@version``, the task's main metric (with its
unit and better direction, as on the page) as mean ± std over the seeds and their number, a key secondary metric or
two when the record has them (:data:`SECONDARY`), and whether the record was computed by this run (with its wall
time) or reused from an earlier one. Failed pairs get a row and, under the table, their one-line message. Then where
the full leaderboard is. Pure functions of records -> text; the caller says which records were reused
(``reuse.reused_pairs``).
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .format import column_unit, finite, fmt, fmt_mean_std, header

#: Secondary metrics shown beside a main metric, by the main metric's base name; a main metric with a variant
#: (``top1_k20``) gets the same variant of them (``nll_k20``, ``ece_k20``). Chosen because every task kind that
#: records the base also records these: calibration beside accuracy, the false-positive rate beside the AUROC, the
#: clean error beside the corruption error.
SECONDARY: dict[str, tuple[str, ...]] = {"top1": ("nll", "ece"), "auroc": ("fpr95",), "mce": ("clean_error",)}

COLUMNS = ["model", "task", "main metric", "mean ± std", "seeds", "also", "record"]


def _is_error(rec: Any) -> bool:
    return getattr(rec, "record_type", "") == "error"


def secondary_metrics(main: str, available: Collection[str]) -> list[str]:
    """The :data:`SECONDARY` metrics of main metric ``main`` that are in ``available``, in table order.

    >>> secondary_metrics("top1_k20", {"top1_k20", "nll_k20", "ece_k20", "nll_k10"})
    ['nll_k20', 'ece_k20']
    >>> secondary_metrics("effective_rank", {"dims_99"})
    []
    """
    for base, others in SECONDARY.items():
        if main == base or main.startswith(base + "_"):
            variant = main[len(base):]
            return [m + variant for m in others if m + variant in available]
    return []


def _value(metric: str, value: Any) -> str:
    unit = column_unit(metric, [value])
    return f"{metric} {fmt(value, unit)}{'%' if unit in ('rate', 'percent') else ''}"


def _row(rec: Any, reused: Collection[tuple[str, str]]) -> list[str]:
    task = f"{rec.task}@{rec.task_version}"
    if _is_error(rec):
        return [rec.model, task, "—", "—", "—", "", "failed"]
    main = rec.main_score
    mean, std = rec.mean.get(main), rec.std.get(main)
    unit = column_unit(main, [mean])
    also = ", ".join(_value(m, rec.mean[m]) for m in secondary_metrics(main, rec.mean) if finite(rec.mean[m]))
    how = "reused" if (rec.model, rec.task) in reused else f"computed ({rec.wall_time_s:.1f} s)"
    return [rec.model, task, header(main, unit), fmt_mean_std(mean, std, len(rec.seeds), unit), str(len(rec.seeds)),
            also, how]


def run_table(records: Sequence[Any], reused: Collection[tuple[str, str]] = ()) -> str:
    """The table of a run's records (ResultRecord / ErrorRecord), then a ``Failed runs:`` list of each failed
    pair's message; ``reused``: the (model, task) of the records an earlier run computed.

    >>> from prosmin_bench.results import ErrorRecord
    >>> print(run_table([ErrorRecord(model="m", task="t", task_version=1, error_type="DataError", message="no data")]),
    ...       end="")
    model    task    main metric    mean ± std    seeds    also    record
    -------  ------  -------------  ------------  -------  ------  --------
    m        t@1     —              —             —                failed
    <BLANKLINE>
    Failed runs:
      m / t: no data
    """
    if not records:
        return "No (model, task) pair was evaluated.\n"
    text = tabulate([_row(r, reused) for r in records], COLUMNS, tablefmt="simple", disable_numparse=True) + "\n"
    failed = [r for r in records if _is_error(r)]
    if failed:
        text += "\nFailed runs:\n" + "".join(f"  {r.model} / {r.task}: {r.message}\n" for r in failed)
    return text


def where_next(results_dir: str | Path, written: Sequence[str | Path] = ()) -> str:
    """The lines under the table: the command that prints the full leaderboard of ``results_dir``, and the page(s)
    ``run --leaderboard`` wrote (``written``) or how to write one.

    >>> print(where_next("/r"), end="")
    Full leaderboard (every result in /r): prosmin-bench leaderboard --results /r
    As a markdown page with figures: add --out FILE.md (or run with --leaderboard FILE.md).
    """
    folder = shlex.quote(str(results_dir))
    text = f"Full leaderboard (every result in {results_dir}): prosmin-bench leaderboard --results {folder}\n"
    if written:
        return text + "Leaderboard written: " + ", ".join(str(p) for p in written) + "\n"
    return text + "As a markdown page with figures: add --out FILE.md (or run with --leaderboard FILE.md).\n"
