"""The sections of a suite's page, each a list of markdown lines: the numbers reported in papers, the task families
(a table per task with its 95% intervals and significance marks, its metric groups, its folded metrics and its
figures) and the lists of stale, failed, misfiled and unreadable results. The measured summary is
:mod:`.summary`."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .. import plots
from ..metrics import metric_info, parse_metric_name
from ..metrics.info import GROUPS, PREDICTIVE, PROJECTOR
from ..reported import ReportedScore
from ..results import ResultRecord
from .board import (
    FAMILY_TITLES, Board, family_key, is_reference, pretraining_overlap, sorted_by_main, task_deviations, task_kind,
    task_main_metric, variant_of,
)
from .format import (
    arrow, cell, column_unit, fmt, fmt_ci, fmt_mean_std, header, marked, model_cell, natural_key, on_grid_edge,
    ref_text, table, task_mark,
)
from .protocol_notes import deviating_tasks_lines, deviation_lines, mce_note_lines, variant_gap_lines
from .significance import Verdict, task_verdicts, untested_lines

#: Folder (next to the markdown) holding ``<suite>/<task>_<plot>.png``.
FIGURES_DIR = "figures"
#: Above this many metric columns a task's model table folds metric groups into a per-metric table.
MAX_COLUMNS = 12


# ------------------------------------------------------------------------------------------------ figures
@dataclass(frozen=True)
class PagePlot:
    spec: plots.PlotSpec
    suite: str

    @property
    def link(self) -> str:
        return f"{FIGURES_DIR}/{self.suite}/{self.spec.filename}"


def page_plots(current: Mapping[str, Sequence[ResultRecord]], suite: str) -> dict[str, list[PagePlot]]:
    """Task -> the figures its section links to."""
    return {t: [PagePlot(s, suite) for s in plots.plan(rs)] for t, rs in current.items()}


# ------------------------------------------------------------------------------------------------ reported
class Sources:
    """Page-level numbering of citations: [1], [2], ... in sorted order."""

    def __init__(self, rows: Sequence[ReportedScore]) -> None:
        self.numbers = {s: i + 1 for i, s in enumerate(sorted({r.source for r in rows}))}

    def refs(self, sources: Iterable[str]) -> str:
        return "[" + ", ".join(str(n) for n in sorted(self.numbers[s] for s in set(sources))) + "]"

    def lines(self) -> list[str]:
        return [f"{n}. {s}" for s, n in sorted(self.numbers.items(), key=lambda kv: kv[1])]


def reported_table(rows: Sequence[ReportedScore], columns: Sequence[tuple[str, str]], sources: Sources,
                   with_task: bool) -> str:
    """One row per (model, epochs, note); a cell per (task, metric) column holding each distinct value with the
    numbers of its sources, e.g. ``77.00 [2] / 76.80 [4]`` when two papers disagree."""
    cells: dict[tuple[str, int, str], dict[tuple[str, str], dict[float, list[str]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        cells[(r.model, r.epochs or 0, r.note)][(r.task, r.metric)][r.value].append(r.source)
    unit = {c: column_unit(c[1], [r.value for r in rows if (r.task, r.metric) == c]) for c in columns}
    headers = ["model (reported)", "epochs", "note"] + [
        (f"{t} {header(m, unit[(t, m)])}" if with_task else header(m, unit[(t, m)])) for t, m in columns
    ]
    body = []
    for (model, epochs, note), by_col in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        if not any(c in by_col for c in columns):
            continue
        row = [model, str(epochs) if epochs else "—", note or "—"]
        for c in columns:
            values = by_col.get(c, {})
            parts = sorted(((sources.refs(srcs), v) for v, srcs in values.items()), key=lambda p: (p[0], p[1]))
            row.append(" / ".join(f"{fmt(v, unit[c])} {ref}" for ref, v in parts) or "—")
        body.append(row)
    return table(body, headers)


def reported_summary_lines(reported: Sequence[ReportedScore], current: Mapping[str, Sequence[ResultRecord]],
                           sources: Sources) -> list[str]:
    """The reported summary: each task's main score as the papers report it, then the numbered sources."""
    if not reported:
        return []
    task_names = sorted({r.task for r in reported}, key=lambda t: (family_key(task_kind(t, current)), t))
    columns: list[tuple[str, str]] = []
    for t in task_names:
        metrics = sorted({r.metric for r in reported if r.task == t}, key=natural_key)
        main = task_main_metric(t, current)
        columns += [(t, main)] if main in metrics else [(t, m) for m in metrics]
    return ["\n## Reported in papers (not measured here)\n",
            "Main scores as the papers report them, converted to the units above, with the numbers of their sources "
            "(listed below the table); all reported metrics are in the task sections. `epochs`: pretraining epochs "
            "of the paper's model, when the source says.\n",
            reported_table(reported, columns, sources, with_task=True),
            *deviating_tasks_lines(task_names),
            *mce_note_lines(reported),
            "\nSources:\n",
            *sources.lines()]


# ------------------------------------------------------------------------------------------------ metric groups
@dataclass(frozen=True)
class GroupTable:
    """How a metric group (``MetricInfo.group``: metrics only some models report) is introduced on a page."""

    title: str
    note: str


#: The table of each metric group under a task's table (issue 10); the order of ``GROUPS`` is the page order.
GROUP_TABLES: dict[str, GroupTable] = {
    PREDICTIVE: GroupTable(
        title="Predictive distribution (probabilistic models only)",
        note="Scores from the model's own predictive distribution N(mu, diag(sigma^2)) (ProSMin's online "
             "predictor); models without one have no row here."),
    PROJECTOR: GroupTable(
        title="Projector outputs (checkpoints of the pretraining module only)",
        note="Measured on the projection head output of the evaluated network (the online network for ProSMin, "
             "paper Sec. 6, and MoCo-v3's base encoder; the teacher for DINO and iBOT; the target for a "
             "`network = target` variant); models from other sources have no row here."),
}


def explain_group(group: str, metrics: Sequence[str]) -> str:
    """The line under a group's title: its note, then what each kind of metric present is (once each)."""
    texts: list[str] = []
    for m in metrics:
        text = metric_info(m).description
        if text and text not in texts:
            texts.append(text)
    return " ".join([GROUP_TABLES[group].note, *(f"{t}." for t in texts)])


def group_metrics(metrics: Sequence[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(metrics for the task's table, [(group, its metrics), ...] for the groups present); ``metrics[0]`` (the
    main score) always stays in the task's table, order kept.

    >>> group_metrics(["auroc", "fpr95", "sigma_auroc", "proj_effective_rank"])
    (['auroc', 'fpr95'], [('predictive', ['sigma_auroc']), ('projector', ['proj_effective_rank'])])
    """
    if not metrics:
        return [], []
    group_of = {m: metric_info(m).group for m in metrics[1:]}
    groups = [(g, [m for m in metrics[1:] if group_of[m] == g]) for g in GROUPS]
    groups = [(g, ms) for g, ms in groups if ms]
    taken = {m for _, ms in groups for m in ms}
    return [m for m in metrics if m not in taken], groups


def split_metrics(metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    """(model-table, folded) metric names, order kept; ``metrics[0]`` is the main score and is never folded.

    Folded: names of one ImageNet-C corruption (``ce_fog``, ``error_fog_s3``, ...); then, while more than
    :data:`MAX_COLUMNS` remain, groups of 3 or more names sharing a first word other than the main score's
    (``energy_auroc``, ``energy_fpr95``, ... of an OOD task that reports several scores).

    >>> split_metrics(["mce", "ce_fog", "clean_error", "error_fog_s1"])
    (['mce', 'clean_error'], ['ce_fog', 'error_fog_s1'])
    """
    if not metrics:
        return [], []
    names = {m: parse_metric_name(m) for m in metrics}
    main = metrics[0]
    folded = {m for m in metrics[1:] if names[m].corruption}
    kept = [m for m in metrics if m not in folded]
    if len(kept) > MAX_COLUMNS:
        first = defaultdict(list)
        for m in kept[1:]:
            first[names[m].first_word].append(m)
        main_word = names[main].first_word
        folded |= {m for word, ms in first.items() if len(ms) >= 3 and word != main_word for m in ms}
    return [m for m in metrics if m not in folded], [m for m in metrics if m in folded]


# ------------------------------------------------------------------------------------------------ measured
def _protocol_text(rs: Sequence[ResultRecord]) -> str:
    first = rs[0].protocol or {}
    text = ", ".join(f"{k} = {json.dumps(v, sort_keys=True)}" for k, v in sorted(first.items())) or "—"
    differ = [r.model for r in rs if (r.protocol or {}) != first]
    if differ:
        text += f" (differs for {', '.join(differ)})"
    return text


def _model_cell(r: ResultRecord) -> str:
    base = variant_of(r)
    network = (r.model_info or {}).get("network") if base else None
    return model_cell(r.model, pretraining_overlap(r), reference=is_reference(r), edge=on_grid_edge(r.extras),
                      variant_of=base, network=network if isinstance(network, str) else None)


def _measured_task_lines(task: str, rs: Sequence[ResultRecord], figures: Sequence[PagePlot],
                         verdict: Mapping[str, Verdict]) -> list[str]:
    lines: list[str] = []
    main = rs[0].main_score
    version = rs[0].task_version
    lines.append(f"\n### {task}@{version}{task_mark(task_deviations(task))}\n")
    datasets = ", ".join(f"{role} `{ref_text(ref)}`" for role, ref in sorted((rs[0].datasets or {}).items()))
    lines.append(f"Main score `{main}` ({arrow(main)}). Datasets: {datasets or '—'}. "
                 f"Protocol: {_protocol_text(rs)}.\n")
    metrics = sorted({k for r in rs for k in r.mean}, key=natural_key)
    metrics = [main] + [m for m in metrics if m != main]
    own, groups = group_metrics(metrics)
    headline, detail = split_metrics(own)
    unit = {m: column_unit(m, [v for r in rs for v in (r.mean.get(m), r.std.get(m)) if v is not None])
            for m in metrics}
    ordered = sorted_by_main(rs, main)
    with_ci = any(main in (r.ci95 or {}) for r in rs)  # records made before intervals were recorded have none
    rows = []
    for r in ordered:
        cells = [fmt_mean_std(r.mean.get(m), r.std.get(m), len(r.seeds), unit[m]) for m in headline]
        cells[0] = marked(cells[0], verdict[r.model].status if r.model in verdict else "")
        if with_ci:
            cells.insert(1, fmt_ci((r.ci95 or {}).get(main), unit[main]))
        rows.append([_model_cell(r), str(len(r.seeds))] + cells)
    headers = [header(m, unit[m]) for m in headline]
    if with_ci:
        headers.insert(1, f"{main} 95% CI{' (%)' if unit[main] in ('rate', 'percent') else ''}")
    lines.append(table(rows, ["model", "seeds"] + headers))
    lines += untested_lines(verdict)
    if detail:
        # One row per metric (models as columns): 100+ columns (per corruption and severity) are unreadable.
        lines.append(f"\n<details><summary>More metrics ({len(detail)}), one row per metric</summary>\n")
        body = [[header(m, unit[m])] + [fmt_mean_std(r.mean.get(m), r.std.get(m), len(r.seeds), unit[m])
                                        for r in ordered] for m in detail]
        lines.append(table(body, ["metric"] + [r.model for r in ordered]))
        lines.append("\n</details>")
    for group, gms in groups:
        has = [r for r in ordered if any(m in r.mean for m in gms)]
        lines.append(f"\n{GROUP_TABLES[group].title}. {explain_group(group, gms)}\n")
        rows = [[_model_cell(r), str(len(r.seeds))]
                + [fmt_mean_std(r.mean.get(m), r.std.get(m), len(r.seeds), unit[m]) for m in gms] for r in has]
        lines.append(table(rows, ["model", "seeds"] + [header(m, unit[m]) for m in gms]))
    for p in figures:
        lines.append(f"\n![{p.spec.caption}]({p.link})")
    return lines


def task_lines(task: str, rs: Sequence[ResultRecord], figures: Sequence[PagePlot],
               reported: Sequence[ReportedScore], sources: Sources,
               verdict: Mapping[str, Verdict] | None = None,
               current: Mapping[str, Sequence[ResultRecord]] | None = None) -> list[str]:
    """A task's section: its measured tables and figures (newest version), the gap to the task it is a protocol
    variant of (from ``current``, the page's records), then the numbers papers report and where its protocol differs
    from theirs."""
    if rs:
        lines = _measured_task_lines(task, rs, figures, task_verdicts(task, rs) if verdict is None else verdict)
        lines += variant_gap_lines(task, rs, current or {})
    else:
        lines = [f"\n### {task}{task_mark(task_deviations(task))}\n", "No measured results yet."]
    if reported:
        metrics = sorted({r.metric for r in reported}, key=natural_key)
        main = rs[0].main_score if rs else task_main_metric(task, {})
        if main in metrics:
            metrics = [main] + [m for m in metrics if m != main]
        lines.append("\nReported in papers (not measured by this suite: the papers' own weights and protocol "
                     "details; sources listed under the reported summary):\n")
        lines.append(reported_table(reported, [(task, m) for m in metrics], sources, with_task=False))
        lines += mce_note_lines(reported)
    lines += deviation_lines(task, rs, bool(reported))
    return lines


def family_lines(current: Mapping[str, Sequence[ResultRecord]], figures: Mapping[str, Sequence[PagePlot]],
                 reported: Sequence[ReportedScore], sources: Sources,
                 verdicts: Mapping[str, Mapping[str, Verdict]] | None = None) -> list[str]:
    """A section per task family (in family order), with the sections of its measured and reported tasks
    (``verdicts``: each task's significance verdicts, computed here when not given)."""
    reported_by_task: dict[str, list[ReportedScore]] = defaultdict(list)
    for r in reported:
        reported_by_task[r.task].append(r)
    families: dict[str, list[str]] = defaultdict(list)
    for t in set(current) | set(reported_by_task):
        families[task_kind(t, current)].append(t)
    lines: list[str] = []
    for kind in sorted(families, key=family_key):
        lines.append(f"\n## {FAMILY_TITLES.get(kind, 'Other tasks')} (`{kind}`)")
        for t in sorted(families[kind]):
            lines += task_lines(t, current.get(t, []), figures.get(t, []), reported_by_task.get(t, []), sources,
                                None if verdicts is None else verdicts.get(t, {}), current)
    return lines


# ------------------------------------------------------------------------------------------------ not tabulated
def stale_and_failed_lines(board: Board, suite: str) -> list[str]:
    """Results of older task versions (never averaged in) and the failed runs of ``suite``."""
    lines: list[str] = []
    stale = board.stale(suite)
    if stale:
        lines.append("\n## Stale results (older task versions, not tabulated)\n")
        newest = board.newest_versions()
        for r in stale:
            lines.append(f"- {r.model} / {r.task}@{r.task_version} (current: @{newest[r.task]}); re-run to update")
    errors = [e for e in board.errors if board.error_suite(e) in (suite, None)]
    if errors:
        lines.append("\n## Failed runs\n")
        for e in errors:
            lines.append(f"- {e.model} / {e.task}@{e.task_version}: {e.error_type}: {cell(e.message)}")
    return lines


def unusable_lines(board: Board, suite: str | None) -> list[str]:
    """The files no table uses: misfiled records (of ``suite``, or of any suite when None) and unreadable ones
    (their suite is unknown, so every page lists them)."""
    lines: list[str] = []
    misfiled = [(path, reason) for path, s, reason in board.misfiled if suite is None or s in (suite, None)]
    if misfiled:
        lines.append("\n## Misfiled records (not tabulated)\n")
        for path, reason in misfiled:
            lines.append(f"- `{path}`: {cell(reason)}")
    if board.unreadable:
        lines.append("\n## Unreadable result files (ignored; re-run to recompute)\n")
        for path, reason in board.unreadable:
            lines.append(f"- `{path}`: {cell(reason)}")
    return lines
