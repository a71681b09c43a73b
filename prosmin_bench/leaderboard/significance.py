"""Which models a task cannot tell apart from its best one: a paired bootstrap on the records' per-image values.

For each ranked task the best model is the learned model (not a reference or variant row) with the best main
score. Every other learned model is compared with it by :func:`prosmin_bench.metrics.paired_bootstrap_ci` on the
per-image values both records store (``ResultRecord.samples``): each of the 1,000 replicates (``DEFAULT_N_BOOT``,
generator seed ``DEFAULT_SEED``, so a page is the same at every render) resamples the test images once for both
models and each model's seeds, and the 95% interval of the difference in the main score is read from the
replicates. When it contains 0 the model is "not significantly different from the best".

Only records of the same test data are compared: the same data-hash mode, the same fingerprint of every dataset the
task evaluated on (every dataset a record read except its training split) and the same number of values. Records
made before per-image values were stored, of other test data, or whose values do not decode are not compared;
:class:`Verdict` says why. References, variant rows and unranked tasks are never compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..metrics import MetricArgumentError, paired_bootstrap_ci
from ..metrics.bootstrap import DEFAULT_N_BOOT, DEFAULT_SEED
from ..record_samples import decode
from ..results import ResultRecord
from .board import is_unranked, sorted_by_main, task_ranked
from .format import finite


#: Why records made before per-image values were recorded are not compared.
NO_VALUES = "no per-image values in the records (made before they were recorded; re-run with --overwrite to add them)"


@dataclass(frozen=True)
class Verdict:
    """How a record compares with its task's best: ``status`` is "best", "same" (the difference's interval holds
    0), "worse" (it does not) or "untested" (``reason`` says why); ``interval``: the difference model - best."""

    status: str
    reason: str = ""
    interval: tuple[float, float] | None = None


def evaluated_data(record: ResultRecord) -> tuple[Any, ...] | None:
    """The identity of the data ``record`` was evaluated on: its data-hash mode and the (reference, fingerprint) of
    every dataset it read but its training split; None when the record does not name its data."""
    data = record.data if isinstance(record.data, dict) else {}
    sets = data.get("sets")
    if not isinstance(sets, dict) or not sets:
        return None
    train = (record.datasets or {}).get("train")
    read = sorted((str(e.get("ref")), str(e.get("fingerprint"))) for e in sets.values()
                  if isinstance(e, dict) and e.get("ref") != train)
    return (data.get("hash"), tuple(read))


def _samples(record: ResultRecord) -> Any:
    if not record.samples:
        return None
    try:
        return decode(record.samples, record.seeds)
    except (MetricArgumentError, KeyError, ValueError, TypeError):
        return None


def _compare(record: ResultRecord, best: ResultRecord, best_samples: Any) -> Verdict:
    if not record.samples or not best.samples:
        return Verdict("untested", NO_VALUES)
    if evaluated_data(record) is None or evaluated_data(record) != evaluated_data(best):
        return Verdict("untested", f"it was not evaluated on the same test data as {best.model}")
    samples = _samples(record)
    if samples is None or best_samples is None:
        return Verdict("untested", "its per-image values cannot be read")
    if samples.kind != best_samples.kind or samples.sizes != best_samples.sizes:
        return Verdict("untested", f"its per-image values do not pair with those of {best.model}")
    low, high = paired_bootstrap_ci(samples, best_samples, n_boot=DEFAULT_N_BOOT, seed=DEFAULT_SEED)
    if not (math.isfinite(low) and math.isfinite(high)):
        return Verdict("untested", "the interval of the difference is not finite")
    return Verdict("same" if low <= 0.0 <= high else "worse", interval=(low, high))


def task_verdicts(task: str, rs: Sequence[ResultRecord]) -> dict[str, Verdict]:
    """Model -> Verdict for the learned models of a ranked task with a finite main score (empty otherwise)."""
    if not rs or not task_ranked(task, rs):
        return {}
    main = rs[0].main_score
    learned = [r for r in sorted_by_main(rs, main) if not is_unranked(r) and finite(r.mean.get(main))]
    if not learned:
        return {}
    best = learned[0]
    out = {best.model: Verdict("best")}
    best_samples = _samples(best)
    for r in learned[1:]:
        out[r.model] = _compare(r, best, best_samples)
    return out


def verdicts(current: Mapping[str, Sequence[ResultRecord]]) -> dict[str, dict[str, Verdict]]:
    """Task -> model -> Verdict for every task of a page (:func:`task_verdicts`)."""
    return {t: task_verdicts(t, rs) for t, rs in current.items()}


def untested_lines(task_verdict: Mapping[str, Verdict]) -> list[str]:
    """The sentence under a task's table naming the models not compared with the best, and why."""
    untested = [(m, v.reason) for m, v in sorted(task_verdict.items()) if v.status == "untested"]
    if not untested:
        return []
    if len(untested) == len(task_verdict) - 1 and all(reason == NO_VALUES for _, reason in untested):
        return [f"\nNo significance test: {NO_VALUES}."]
    by_reason: dict[str, list[str]] = {}
    for m, reason in untested:
        by_reason.setdefault(reason, []).append(m)
    parts = [f"{', '.join(ms)} ({reason})" for reason, ms in by_reason.items()]
    return [f"\nNot compared with the best for significance: {'; '.join(parts)}."]
