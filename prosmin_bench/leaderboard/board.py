"""The board: every record of a results folder, and what a suite's page tabulates from them.

Each task is tabulated at its newest version only (older versions are stale, never averaged in); tasks are grouped
by family (their kind) and models ranked by each task's main score in its better direction.

Pretraining on evaluation data. A record's ``model_info.pretrained_on`` lists the datasets the backbone saw in
pretraining (``"digits:train"``; a bare name such as ``"imagenet"`` means the whole dataset).
:func:`pretraining_overlap` says ``"eval"`` when it was pretrained on data the task evaluates on (the same dataset
and split, or an unspecified split, as any dataset role other than ``train``), ``"train"`` when on another split of
an evaluation dataset (the standard self-supervised protocol), else ``""``.

Rows never ranked: references (``model_info.reference``) and variants of another model (``model_info.variant_of``);
both are tabulated, the variants beside the model they are a variant of.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UnknownNameError
from ..metrics import higher_is_better
from ..results import CorruptRecord, ErrorRecord, MisfiledRecord, ResultRecord, scan_files
from ..tasks import get_task_spec
from .format import finite

#: Task families in page order, with their section titles; other kinds follow alphabetically.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("knn", "k-NN classification"),
    ("linear", "Linear probe"),
    ("linear_aug", "Linear probe on augmented images (DINO's eval_linear.py as run)"),
    ("lowshot", "Low-shot classification (frozen features)"),
    ("semisup", "Semi-supervised fine-tuning"),
    ("ood", "Out-of-distribution detection"),
    ("corruption", "Corruption robustness"),
    ("transfer_finetune", "Transfer by fine-tuning"),
    ("collapse", "Dimensional collapse"),
)
FAMILY_TITLES = {**dict(FAMILIES), "unregistered": "Tasks without a card in this installation"}
_FAMILY_ORDER = {k: i for i, (k, _) in enumerate(FAMILIES)}


def family_key(kind: str) -> tuple[int, str]:
    """Sort key of a task kind: the families in page order, then other kinds alphabetically."""
    return (_FAMILY_ORDER.get(kind, len(_FAMILY_ORDER)), kind)


def newest_versions(records: Iterable[ResultRecord]) -> dict[str, int]:
    """Task -> the newest version among ``records``: the only version of a task that is tabulated or averaged."""
    newest: dict[str, int] = {}
    for r in records:
        newest[r.task] = max(newest.get(r.task, r.task_version), r.task_version)
    return newest


def registered_task(task: str, attr: str) -> Any:
    """An attribute of a registered task card, or None for a task this installation has no card for (a paper
    task, or an error record of a task since removed)."""
    try:
        return getattr(get_task_spec(task), attr)
    except UnknownNameError:
        return None


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class Board:
    """Everything read from a results folder."""

    results: list[ResultRecord] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the folder, reason)
    # (path relative to the folder, the record's suite or None, reason): valid records in another pair's file,
    # never tabulated (a backup copy would otherwise replace its model's number).
    misfiled: list[tuple[str, str | None, str]] = field(default_factory=list)

    def newest_versions(self) -> dict[str, int]:
        return newest_versions(self.results)

    def current(self, suite: str) -> dict[str, list[ResultRecord]]:
        """Task -> records of its newest version in ``suite``, sorted by model."""
        newest = self.newest_versions()
        out: dict[str, list[ResultRecord]] = defaultdict(list)
        for r in self.results:
            if r.suite == suite and r.task_version == newest[r.task]:
                out[r.task].append(r)
        return {t: sorted(rs, key=lambda r: r.model) for t, rs in sorted(out.items())}

    def stale(self, suite: str) -> list[ResultRecord]:
        newest = self.newest_versions()
        rs = [r for r in self.results if r.suite == suite and r.task_version < newest[r.task]]
        return sorted(rs, key=lambda r: (r.task, r.task_version, r.model))

    def error_suite(self, e: ErrorRecord) -> str | None:
        """The suite of an error record: its own field if any, else that of results of the task, else the card's."""
        own = getattr(e, "suite", "")
        if own:
            return own
        for r in self.results:
            if r.task == e.task:
                return r.suite
        return registered_task(e.task, "suite")

    def suites(self) -> list[str]:
        found = {r.suite for r in self.results} | {s for e in self.errors if (s := self.error_suite(e))}
        return sorted(found | {s for _, s, _ in self.misfiled if s})


def collect(results_dir: str | os.PathLike) -> Board:
    """Read every record under ``results_dir`` (unreadable files are kept aside with their reason)."""
    root = Path(results_dir)
    board = Board()
    for path, item in scan_files(root):
        if not isinstance(item, CorruptRecord):
            (board.results if isinstance(item, ResultRecord) else board.errors).append(item)
            continue
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        prefix, reason = f"{path}: ", str(item)
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
        if isinstance(item, MisfiledRecord):
            rec = item.record
            suite = rec.suite if isinstance(rec, ResultRecord) else registered_task(rec.task, "suite")
            board.misfiled.append((rel, suite, reason))
        else:
            board.unreadable.append((rel, reason))
    board.errors.sort(key=lambda e: (e.model, e.task, e.task_version))
    board.unreadable.sort()
    board.misfiled.sort(key=lambda m: m[0])
    return board


def task_main_metric(task: str, current: Mapping[str, Sequence[ResultRecord]]) -> str | None:
    if task in current:
        return current[task][0].main_score
    return registered_task(task, "main_score")  # None: every reported metric of the task is shown


def task_kind(task: str, current: Mapping[str, Sequence[ResultRecord]]) -> str:
    if task in current:
        return current[task][0].task_kind
    return registered_task(task, "kind") or "unregistered"


# ------------------------------------------------------------------------------------------------ contamination
def _parse_ref(ref: Any) -> tuple[str, str | None] | None:
    """(dataset, split or None) of a dataset reference: ``"name:split"``, a bare name, or a source table."""
    if isinstance(ref, str):
        name, sep, split = ref.partition(":")
        return name, (split if sep else None)
    if isinstance(ref, Mapping):
        name = ref.get("path") or ref.get("root")
        return (str(name), str(ref["split"]) if "split" in ref else None) if name else None
    return None


def pretraining_overlap(record: ResultRecord) -> str:
    """``"eval"`` (pretrained on data the task evaluates on), ``"train"`` (on another split, e.g. train, of an
    evaluation dataset) or ``""`` (no overlap), from ``model_info.pretrained_on`` and the record's datasets."""
    seen = [p for p in (_parse_ref(x) for x in (record.model_info or {}).get("pretrained_on") or []) if p]
    if not seen:
        return ""
    roles = {role: _parse_ref(ref) for role, ref in (record.datasets or {}).items()}
    evaluated = [d for role, d in roles.items() if d and role != "train"]
    for name, split in seen:
        for ename, esplit in evaluated:
            if name == ename and (split is None or esplit is None or split == esplit):
                return "eval"
    eval_names = {n for n, _ in evaluated}
    return "train" if any(name in eval_names for name, _ in seen) else ""


# ------------------------------------------------------------------------------------------------ ranking
def is_reference(record: ResultRecord) -> bool:
    """A non-learned reference row (``model_info["reference"]``, e.g. raw pixels): shown, never ranked."""
    return (record.model_info or {}).get("reference") is True


def variant_of(record: ResultRecord) -> str | None:
    """The model a variant row is a variant of (``model_info["variant_of"]``: the same weights seen another way,
    e.g. ``prosmin_target_micro``, the ``prosmin_micro`` checkpoint through its target network), else None."""
    value = (record.model_info or {}).get("variant_of")
    return value if isinstance(value, str) and value else None


def is_unranked(record: ResultRecord) -> bool:
    """A row that is shown but never ranked, best or compared: a reference (:func:`is_reference`) or a variant of
    another model (:func:`variant_of`), which would otherwise count its method twice."""
    return is_reference(record) or variant_of(record) is not None


def task_deviations(task: str) -> tuple[Any, ...]:
    """The card's ``deviations`` (``tasks.base.Deviation``: where the task's protocol differs from the paper's
    behind the reported numbers), () when it states none or has no card in this installation."""
    return tuple(registered_task(task, "deviations") or ())


def task_variant_of(task: str) -> str | None:
    """The task ``task`` is a protocol variant of (its card's ``variant_of``), None when none or no card."""
    return registered_task(task, "variant_of")


def task_ranked(task: str, rs: Sequence[ResultRecord]) -> bool:
    """Whether ``task`` counts in the mean rank: its records' ``ranked``, else (records made before it was recorded)
    its card's, else True."""
    recorded = {r.ranked for r in rs if r.ranked is not None}
    if recorded:
        return all(recorded)
    card = registered_task(task, "ranked")
    return True if card is None else bool(card)


def _rank(values: dict[str, float], higher: bool) -> dict[str, float]:
    """Average ranks (1 = best; ties share the mean of their positions); non-finite values are left out."""
    items = sorted(((-v if higher else v), m) for m, v in values.items() if finite(v))
    ranks: dict[str, float] = {}
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1][0] == items[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[items[k][1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mean_ranks(current: Mapping[str, Sequence[ResultRecord]]) -> dict[str, float]:
    """Each learned model's mean over the ranked tasks (:func:`task_ranked`) of its rank by the task's main score; a
    missing result counts as last. Reference and variant rows (:func:`is_unranked`) are left out; NaN when no task is
    ranked."""
    models = sorted({r.model for rs in current.values() for r in rs if not is_unranked(r)})
    ranked = {t: [r for r in rs if not is_unranked(r)] for t, rs in current.items() if task_ranked(t, rs)}
    if not models:
        return {}
    totals = dict.fromkeys(models, 0.0)
    for rs in ranked.values():
        if not rs:
            continue
        main = rs[0].main_score
        ranks = _rank({r.model: r.mean.get(main, float("nan")) for r in rs}, higher_is_better(main))
        for m in models:
            totals[m] += ranks.get(m, float(len(models)))
    n = sum(1 for rs in ranked.values() if rs)
    return {m: totals[m] / n if n else float("nan") for m in models}


def sorted_by_main(rs: Sequence[ResultRecord], main: str) -> list[ResultRecord]:
    """Records best first by ``main`` in its better direction, references after the learned models; records without a
    finite value last (within each), by model. A variant row (:func:`variant_of`) follows the row of the model it is
    a variant of (side by side), or comes last when that model has no row here."""
    higher = higher_is_better(main)

    def key(r: ResultRecord) -> tuple[bool, int, float, str]:
        v = r.mean.get(main, float("nan"))
        return (is_reference(r), *((0, -v if higher else v, r.model) if finite(v) else (1, 0.0, r.model)))

    return beside_bases(sorted((r for r in rs if variant_of(r) is None), key=key),
                        sorted((r for r in rs if variant_of(r) is not None), key=key), lambda r: r.model, variant_of)


def beside_bases(rows: Sequence[Any], variants: Sequence[Any], name: Any, base: Any) -> list[Any]:
    """``rows`` in order, each followed by the ``variants`` whose ``base(v)`` is its ``name(row)`` (in their order);
    variants whose base has no row come last."""
    out: list[Any] = []
    placed: set[int] = set()
    for row in rows:
        out.append(row)
        for i, v in enumerate(variants):
            if i not in placed and base(v) == name(row):
                out.append(v)
                placed.add(i)
    return out + [v for i, v in enumerate(variants) if i not in placed]
