"""The measured summary of a suite's page (and of the README): one row per model with every task's main score and
its significance mark, learned models by mean rank over the ranked tasks, then the reference rows; and the two
sentences the mini page opens with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..results import ResultRecord
from .board import (
    Board, beside_bases, family_key, is_reference, is_unranked, mean_ranks, pretraining_overlap, sorted_by_main,
    task_deviations, task_ranked, variant_of,
)
from .format import NOT_RANKED, column_unit, finite, fmt, fmt_mean_std, header, marked, model_cell, table, task_mark
from .significance import Verdict, verdicts as all_verdicts

#: The reference whose place the mini page states in its opening (the model ``pixels``: raw normalised pixels).
PIXELS = "pixels"
#: The task the mini page places ``pixels`` on when it has a record there (else the first ranked task it has).
PIXELS_TASK = "digits_knn"


def _unit(rs: Sequence[ResultRecord]) -> str:
    main = rs[0].main_score
    return column_unit(main, [v for r in rs for v in (r.mean.get(main), r.std.get(main)) if v is not None])


def summary_lines(board: Board, suite: str, current: Mapping[str, Sequence[ResultRecord]],
                  verdicts: Mapping[str, Mapping[str, Verdict]] | None = None) -> list[str]:
    """The measured summary: one row per learned model, sorted by mean rank, then the references; each main score
    bold when best and marked when not significantly different from the best (``verdicts``, computed when None)."""
    if not current:
        return [f"No measured results for this suite yet: run `prosmin-bench run --suite {suite}`."]
    verdicts = all_verdicts(current) if verdicts is None else verdicts
    failed_current = {(e.model, e.task) for e in board.errors
                      if e.task not in current or e.task_version >= current[e.task][0].task_version}
    ranks = mean_ranks(current)
    tasks = sorted(current, key=lambda t: (family_key(current[t][0].task_kind), t))
    by = {(r.model, r.task): r for rs in current.values() for r in rs}
    references = sorted({r.model for rs in current.values() for r in rs if is_reference(r)} - set(ranks))
    # variant rows (model_info.variant_of): never ranked, listed right after the model they are a variant of
    variant = {r.model: base for rs in current.values() for r in rs if not is_reference(r) and (base := variant_of(r))}
    learned = sorted(ranks, key=lambda m: (not finite(ranks[m]), ranks[m] if finite(ranks[m]) else 0.0, m))
    unit = {t: _unit(current[t]) for t in tasks}
    headers = ["model", "method"] + [
        f"{t}@{current[t][0].task_version}{task_mark(task_deviations(t))} {header(current[t][0].main_score, unit[t])}"
        + ("" if task_ranked(t, current[t]) else f" {NOT_RANKED}") for t in tasks
    ] + ["mean rank ↓"]
    rows = []
    order = beside_bases(learned + references, sorted(set(variant) - set(ranks)), lambda m: m, variant.get)
    for m in order:
        info = next((by[(m, t)].model_info for t in tasks if (m, t) in by), {}) or {}
        overlaps = {pretraining_overlap(by[(m, t)]) for t in tasks if (m, t) in by}
        mark = "eval" if "eval" in overlaps else "train" if "train" in overlaps else ""
        network = info.get("network") if m in variant else None
        row = [model_cell(m, mark, reference=m in references, variant_of=variant.get(m) if m not in ranks else None,
                          network=network if isinstance(network, str) else None),
               str(info.get("method") or "—")]
        for t in tasks:
            r = by.get((m, t))
            if r is None:
                row.append("failed" if (m, t) in failed_current else "—")
            else:
                text = fmt_mean_std(r.mean.get(r.main_score), r.std.get(r.main_score), len(r.seeds), unit[t])
                verdict = verdicts.get(t, {}).get(m)
                row.append(marked(text, verdict.status if verdict else ""))
        row.append(f"{ranks[m]:.2f}" if m in ranks and finite(ranks[m]) else "—")
        rows.append(row)
    return [table(rows, headers),
            f"\nRows are sorted by mean rank over the ranked tasks by main score (ties share ranks; a missing result "
            f"counts as last); tasks marked {NOT_RANKED}, reference rows and variant rows are left out of it. A mark "
            "on a model holds for at least one task; see the task sections."]


def _pixels_sentence(current: Mapping[str, Sequence[ResultRecord]]) -> str:
    """Where the ``pixels`` reference sits: its main score on one task against the best learned model's; "" when
    there is no pixels record to compare."""
    tasks = sorted(current, key=lambda t: (t != PIXELS_TASK, family_key(current[t][0].task_kind), t))
    for t in tasks:
        rs = current[t]
        if not task_ranked(t, rs):
            continue
        main = rs[0].main_score
        pixels = next((r for r in rs if r.model == PIXELS and finite(r.mean.get(main))), None)
        learned = [r for r in sorted_by_main(rs, main) if not is_unranked(r) and finite(r.mean.get(main))]
        if pixels is None or not learned:
            continue
        unit = _unit(rs)
        pct = "%" if unit in ("rate", "percent") else ""
        return (f"The `{PIXELS}` reference (the raw normalised pixels as features, nothing learned) scores "
                f"{fmt(pixels.mean[main], unit)}{pct} on {t} (`{main}`), against {fmt(learned[0].mean[main], unit)}"
                f"{pct} for the best learned model, {learned[0].model}.")
    return ""


def mini_intro_lines(current: Mapping[str, Sequence[ResultRecord]]) -> list[str]:
    """The mini page's opening: what the suite is, and where the ``pixels`` reference sits (when it has records)."""
    text = ("The mini suite is a 32-px, 1.4k-image smoke test of every protocol and method (micro ViTs pretrained "
            "on scikit-learn's 1,437 training digits, evaluated on its 360 test digits and small bundled OOD and "
            "transfer sets, in minutes on a CPU): its numbers show that everything works, not how the methods rank "
            "on ImageNet.")
    pixels = _pixels_sentence(current)
    return [f"{text} {pixels}".rstrip() + "\n"]
