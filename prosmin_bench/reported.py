"""Numbers reported in papers, shown on leaderboards in their own table and never mixed with measured numbers.

Two sources:

1. model cards (``baselines/*.toml``): one ``[[reported.<task>]]`` table per source and task of the suite whose
   protocol the paper's number corresponds to, holding the metric values under the suite's metric names and a
   citation::

       [[reported.imagenet_linear]]
       top1 = 0.768                     # in record units (see below)
       nll = 0.919
       ece = 0.015
       epochs = 800                     # optional: pretraining epochs of the paper's model
       note = "..."                     # optional: how the paper's model or protocol differs
       source = "Vahidi et al. 2024 (ProSMin, ICLR), Table 1"

   A single ``[reported.<task>]`` table also works; ``unit = "percent"`` (or ``"fraction"``) may be given per
   table, or per metric as ``top1 = { value = 76.8, unit = "percent" }``. A card's ``paper`` field is the
   citation when ``source`` is absent.
2. :data:`PAPER_CONSTANTS`: the tables of docs/protocols.md (the ProSMin paper and the baselines' own papers), each
   with its citation. A constant is shown for a (model, task, metric) only when no card reports that triple, so a
   card always wins and the constants fill in for models without cards (and, in the tests, check the cards).

Units. Records store rates (accuracy, ECE, AUROC, AUPR, FPR, error) as fractions in [0, 1]; mCE is in percent
(100 x mean CE, Hendrycks & Dietterich 2019); NLL in nats (``prosmin_bench.metrics.metric_info`` says which
unit a metric name has). Reported values are converted to the record units:
with ``unit = "percent"`` a rate is divided by 100, with ``unit = "fraction"`` it is kept; without a unit a rate
above 1 is read as a percentage (papers print 77.0 for 77%, but ECE as 0.015), anything else is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CardError
from .metrics import metric_info
from .metrics.info import FRACTION
from .models.zoo import catalogue


def to_record_units(metric: str, value: float, unit: str | None = None) -> float:
    """A paper's number in the units the suite records (rates as fractions).

    >>> to_record_units("top1", 77.0), to_record_units("ece", 0.015), to_record_units("auroc", 90.0, "percent")
    (0.77, 0.015, 0.9)
    >>> to_record_units("mce", 66.1)
    66.1
    """
    if unit not in (None, "percent", "fraction"):
        raise CardError(f"Expected unit 'percent' or 'fraction' for reported {metric!r}, but got {unit!r}")
    if metric_info(metric).unit != FRACTION or unit == "fraction":
        return float(value)
    if unit == "percent" or value > 1.0:
        return float(value) / 100.0
    return float(value)


@dataclass(frozen=True)
class ReportedScore:
    """One number from a paper, in record units, for a task of the suite whose protocol it corresponds to."""

    model: str  # the registered model name the paper's number belongs to
    suite: str
    task: str
    metric: str
    value: float
    source: str  # citation: authors, venue, table
    epochs: int | None = None  # pretraining epochs of the paper's model, when the source says
    note: str = ""  # e.g. "300-epoch model, not the released checkpoint", or a protocol difference
    origin: str = ""  # the card file, or "docs/protocols.md" for the constants


PROSMIN_PAPER = "Vahidi et al. 2024 (ProSMin, ICLR)"
DINO_PAPER = "Caron et al. 2021 (DINO, ICCV)"
IBOT_PAPER = "Zhou et al. 2022 (iBOT, ICLR)"
MOCOV3_PAPER = "Chen, Xie and He 2021 (MoCo v3, ICCV)"


def _c(model: str, task: str, metric: str, value: float, source: str, epochs: int | None = None,
       note: str = "") -> ReportedScore:
    return ReportedScore(model=model, suite="imagenet", task=task, metric=metric, value=value, source=source,
                         epochs=epochs, note=note, origin="docs/protocols.md")


def _paper_rows() -> list[ReportedScore]:
    rows = []
    # ProSMin Table 1 (ViT-S/16, ImageNet): linear top-1 (%), k-NN top-1 (%), NLL, ECE (fraction). The paper's
    # header says 800 epochs; MoCo-v3's ViT-S exists only at 300 epochs, so no epoch count is given for it.
    t1 = f"{PROSMIN_PAPER}, Table 1"
    for model, epochs, lin, knn, nll, ece in (
        ("dino_vits16", 800, 76.8, 74.5, 0.919, 0.015),
        ("mocov3_vits16", None, 73.2, 64.7, 1.152, 0.027),
        ("ibot_vits16", 800, 77.9, 75.2, 0.918, 0.013),
        ("prosmin_vits16", 800, 78.4, 76.2, 0.900, 0.006),
    ):
        rows += [_c(model, "imagenet_linear", "top1", lin / 100, t1, epochs),
                 _c(model, "imagenet_knn", "top1_k20", knn / 100, t1, epochs),
                 _c(model, "imagenet_linear", "nll", nll, t1, epochs),
                 _c(model, "imagenet_linear", "ece", ece, t1, epochs)]
    # ProSMin Table 2 (semi-supervised fine-tuning) and its low-shot rows (frozen features, logistic regression).
    t2 = f"{PROSMIN_PAPER}, Table 2"
    for model, s1, s10, l1, l10 in (
        ("dino_vits16", 60.3, 74.3, 64.5, 72.2),
        ("ibot_vits16", 61.9, 75.1, 65.9, 73.4),
        ("prosmin_vits16", 62.1, 75.6, 66.1, 73.8),
    ):
        rows += [_c(model, "imagenet_semisup_1pct", "top1", s1 / 100, t2),
                 _c(model, "imagenet_semisup_10pct", "top1", s10 / 100, t2),
                 _c(model, "imagenet_lowshot_1pct", "top1", l1 / 100, t2),
                 _c(model, "imagenet_lowshot_10pct", "top1", l10 / 100, t2)]
    # ProSMin Table 4: transfer by fine-tuning, top-1 (%).
    t4 = f"{PROSMIN_PAPER}, Table 4"
    for model, c10, c100, inat, flowers in (
        ("dino_vits16", 99.0, 90.5, 72.0, 98.5),
        ("ibot_vits16", 99.1, 90.7, 73.7, 98.6),
        ("prosmin_vits16", 99.3, 91.2, 74.4, 99.1),
    ):
        rows += [_c(model, "transfer_cifar10", "top1", c10 / 100, t4),
                 _c(model, "transfer_cifar100", "top1", c100 / 100, t4),
                 _c(model, "transfer_inat18", "top1", inat / 100, t4),
                 _c(model, "transfer_flowers102", "top1", flowers / 100, t4)]
    # ProSMin Table 5: ImageNet-O AUROC (%) and ImageNet-C mCE (%), for 300- and 800-epoch models. The registered
    # DINO and ProSMin models are 800-epoch ones, so their 300-epoch rows say so.
    # The paper heads the column 'mCE (↑)' and expands it as 'mean calibration error' (Sec. 5), but the values
    # (65.8-73.5) are Hendrycks & Dietterich's AlexNet-normalised mean corruption error, lower is better (an ECE in
    # percent is 0.6-2.7 in the paper's Table 1): stored as the suite's `mce` (docs/protocols.md, ImageNet-C).
    t5 = f"{PROSMIN_PAPER}, Table 5"
    other = "300-epoch model, not the registered 800-epoch one"
    for model, epochs, auroc, mce, note in (
        ("dino_vits16", 300, 74.0, 68.1, other),
        ("mocov3_vits16", 300, 71.0, 73.5, ""),
        ("prosmin_vits16", 300, 76.0, 66.1, other),
        ("dino_vits16", 800, 76.0, 66.5, ""),
        ("prosmin_vits16", 800, 77.1, 65.8, ""),
        ("ibot_vits16", 800, 76.6, 66.2, ""),
    ):
        rows += [_c(model, "imagenet_o", "auroc", auroc / 100, t5, epochs, note),
                 _c(model, "imagenet_c", "mce", mce, t5, epochs, note)]
    # The baselines' own papers (docs/protocols.md, "Reference numbers from the baselines' own papers").
    rows += [
        _c("dino_vits16", "imagenet_knn", "top1_k20", 0.745, DINO_PAPER, 800),
        _c("dino_vits16", "imagenet_linear", "top1", 0.770, DINO_PAPER, 800),
        _c("ibot_vits16", "imagenet_knn", "top1_k20", 0.752, IBOT_PAPER, 800),
        _c("ibot_vits16", "imagenet_linear", "top1", 0.779, IBOT_PAPER, 800),
        _c("mocov3_vits16", "imagenet_linear", "top1", 0.732, MOCOV3_PAPER, 300, "MoCo v3's own linear protocol"),
    ]
    return rows


#: Paper numbers from docs/protocols.md (ViT-S/16 on ImageNet), in record units, each with its citation. Shown only
#: for a (model, task, metric) that no card reports; the tests also check the cards against them.
PAPER_CONSTANTS: tuple[ReportedScore, ...] = tuple(_paper_rows())

_META_KEYS = {"source", "citation", "note", "unit", "epochs"}


def _card_entries(spec: Any) -> list[ReportedScore]:
    """The ``reported`` tables of one ModelSpec, checked; errors name the card and the field."""
    out: list[ReportedScore] = []
    where = spec.card or spec.name
    if not isinstance(spec.reported, Mapping):
        raise CardError(f"Card {where!r}: field 'reported' must be a table of [reported.<task>] tables")
    for task, tables in sorted(spec.reported.items()):
        tables = [tables] if isinstance(tables, Mapping) else tables
        if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
            raise CardError(f"Card {where!r}: field 'reported.{task}' must be a table (or an array of tables) "
                            "of metric = value with a source")
        for t in tables:
            source = t.get("source") or t.get("citation") or spec.paper
            if not isinstance(source, str) or not source:
                raise CardError(f"Card {where!r}: field 'reported.{task}' needs a 'source' citation "
                                "(or the card's 'paper' field)")
            epochs = t.get("epochs")
            if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
                raise CardError(f"Card {where!r}: field 'reported.{task}.epochs' must be a positive integer, "
                                f"but got {epochs!r}")
            note = t.get("note", "")
            unit = t.get("unit")
            for metric, value in sorted(t.items()):
                if metric in _META_KEYS:
                    continue
                if not metric:
                    raise CardError(f"Card {where!r}: field 'reported.{task}' has a metric with an empty name; "
                                    "name it as the suite's records do (top1, ece, auroc, ...)")
                m_unit = unit
                if isinstance(value, Mapping):
                    m_unit = value.get("unit", unit)
                    value = value.get("value")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise CardError(f"Card {where!r}: field 'reported.{task}.{metric}' must be a number, "
                                    f"but got {value!r}")
                try:
                    v = to_record_units(metric, float(value), m_unit)
                except CardError:
                    raise CardError(f"Card {where!r}: field 'reported.{task}.{metric}' has unit {m_unit!r}; "
                                    "use 'percent' or 'fraction'") from None
                out.append(ReportedScore(model=spec.name, suite=spec.scale, task=task, metric=metric, value=v,
                                         source=source, epochs=epochs, note=str(note), origin=spec.card))
    return out


def reported_scores(suite: str | None = None, *, specs: list[Any] | None = None) -> list[ReportedScore]:
    """Every reported number (cards first, then constants for triples no card reports), sorted.

    Args:
        suite: only this suite's numbers ("mini" or "imagenet"); None for all.
        specs: the ModelSpecs to read (default: every registered model).
    """
    if specs is None:
        specs = [s for _, s in catalogue().items()]
    rows: list[ReportedScore] = []
    for spec in specs:
        if spec.reported:
            rows += _card_entries(spec)
    carded = {(r.model, r.task, r.metric) for r in rows}
    rows += [c for c in PAPER_CONSTANTS if (c.model, c.task, c.metric) not in carded]
    if suite is not None:
        rows = [r for r in rows if r.suite == suite]
    return sorted(rows, key=lambda r: (r.task, r.metric, r.model, r.source, r.epochs or 0, r.note, r.value))
