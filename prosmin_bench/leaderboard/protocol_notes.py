"""Protocol notes on a page (issue 19): the tasks whose protocol differs from the papers' (their cards'
``deviations``, marked ¶), how the suite reads the papers' "mCE", and the gap between a protocol variant (a card's
``variant_of``) and its base task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..reported import ReportedScore
from ..results import ResultRecord
from .board import is_unranked, registered_task, task_deviations, task_variant_of
from .format import MARK_DEVIATES, column_unit, finite, fmt


def deviating_tasks_lines(tasks: Sequence[str]) -> list[str]:
    """The sentence under the reported summary naming its tasks whose protocol here differs from the papers'."""
    marked_tasks = [t for t in tasks if task_deviations(t)]
    if not marked_tasks:
        return []
    return [f"\n{MARK_DEVIATES} This suite's protocol differs from the one behind these numbers for "
            f"{', '.join(marked_tasks)}: each task's section lists how and why (the card's `deviations`); measured "
            "numbers of those tasks are not directly comparable with these."]


def mce_note_lines(reported: Sequence[ReportedScore]) -> list[str]:
    """How the suite reads the papers' "mCE" (issue 19 item 7), under any table that shows a reported ``mce``."""
    values = sorted(r.value for r in reported if r.metric == "mce")
    if not values:
        return []
    return ["\nReported `mce`: ProSMin's Table 5 heads its column \"mCE (↑)\" and its Sec. 5 calls mCE \"mean "
            f"calibration error\", but its numbers ({fmt(values[0], 'percent')}-{fmt(values[-1], 'percent')} here) "
            "are on the scale of Hendrycks & Dietterich's mean corruption error (ICLR 2019: each corruption's top-1 "
            "error summed over severities, divided by AlexNet's, averaged over the 15 corruptions; lower is better), "
            "the definition this suite measures, while a calibration error in percent would be of the order of the "
            "paper's own Table 1 ECEs (0.6-2.7). This suite reads them as mean corruption error, lower is better "
            "(docs/protocols.md, ImageNet-C)."]


def deviation_lines(task: str, rs: Sequence[ResultRecord], reported: bool) -> list[str]:
    """The list of a task's protocol differences from the paper's (its card's ``deviations``), or [];
    ``reported``: whether the section shows numbers papers report."""
    deviations = task_deviations(task)
    if not deviations:
        return []
    version = registered_task(task, "version")
    measured = rs[0].task_version if rs else None
    which = "" if measured in (None, version) else f" (the card's, at version {version}; the records are @{measured})"
    lines = [f"\n{MARK_DEVIATES} Protocol differences from the paper's{which}"
             + (": the numbers papers report for this task come from the paper's protocol, the measured ones from this "
                "one.\n" if reported else ":\n")]
    lines += [f"- `{d.field}`: here {d.ours}. Paper: {d.paper}. Why: {d.why}." for d in deviations]
    return lines


def _gap_text(value: float, unit: str) -> str:
    return f"{100 * value:+.2f}" if unit == "rate" else f"{value:+.2f}" if unit == "percent" else f"{value:+.3f}"


def variant_gap_lines(task: str, rs: Sequence[ResultRecord],
                      current: Mapping[str, Sequence[ResultRecord]]) -> list[str]:
    """For a task that is a protocol variant of another (its card's ``variant_of``): the difference of the main score,
    variant minus the other, of each model with records of both (mean over seeds each), and their mean."""
    base = task_variant_of(task)
    if not base or not rs:
        return []
    base_rs = current.get(base) or []
    main = rs[0].main_score
    head = f"\nProtocol variant of `{base}`"
    if not base_rs:
        return [f"{head}: no records of `{base}` on this page to compare with."]
    if base_rs[0].main_score != main:
        return [f"{head}, whose main score is `{base_rs[0].main_score}`, not `{main}`: no gap computed."]
    by_model = {r.model: r for r in base_rs}
    pairs = [(r.model, r.mean.get(main), by_model[r.model].mean.get(main)) for r in sorted(rs, key=lambda r: r.model)
             if r.model in by_model]
    pairs = [(m, a, b) for m, a, b in pairs if finite(a) and finite(b)]
    if not pairs:
        return [f"{head}: no model has results of both yet."]
    unit = column_unit(main, [v for _, a, b in pairs for v in (a, b)])
    what = "points" if unit in ("rate", "percent") else "raw"
    gaps = [(m, a - b) for m, a, b in pairs]
    # the mean is over the models the page ranks: references and variant rows are listed, not averaged
    unranked = {r.model for r in rs if is_unranked(r)}
    ranked = [g for m, g in gaps if m not in unranked]
    per_model = ", ".join(f"{m} {_gap_text(g, unit)}" + (" (not averaged)" if m in unranked else "") for m, g in gaps)
    mean = (f"mean over {len(ranked)} ranked model{'s' if len(ranked) != 1 else ''} "
            f"{_gap_text(sum(ranked) / len(ranked), unit)}" if ranked else "no ranked model to average")
    return [f"{head}: {task}@{rs[0].task_version} − {base}@{base_rs[0].task_version}, `{main}` ({what}), per model "
            f"(each the difference of the means over seeds): {per_model}; {mean}."]
