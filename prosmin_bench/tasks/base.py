"""Tasks: declarative cards (TOML) + one class per protocol kind.

A task card names a protocol ``kind``, its datasets, protocol parameters, ``main_score``, ``suite`` and
``version`` (bump it whenever a change moves the numbers). Each kind is a small class registered with
``@register_kind`` holding a typed ``Params`` dataclass (the protocol's defaults, each with its source) and one
method, ``run(ctx) -> TaskOutput``, called once per seed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from .. import cards
from ..data.base import DatasetRef
from ..errors import CardError, DataError
from ..metrics import ScoreSamples
from ..metrics.classification import NLL_CLAMP
from ..registry import Registry
from ..settings import EvalSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deviation:
    """One way a card's protocol differs from the paper's (or upstream run's) behind the reported numbers: ``field``
    names the protocol field or aspect, ``paper`` says what the paper did (with a file:line or table citation),
    ``ours`` what the card does, ``why`` the reason. A card lists them in its top-level ``deviations`` array."""

    field: str
    paper: str
    ours: str
    why: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "paper": self.paper, "ours": self.ours, "why": self.why}


@dataclass(frozen=True)
class TaskSpec:
    """One task card, parsed."""

    name: str
    kind: str
    version: int
    main_score: str
    suite: str
    datasets: dict[str, Any]  # role -> the card's reference as written (what records store)
    protocol: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    paper: str = ""
    card: str = ""
    #: whether the task counts in the leaderboard's mean rank: tasks that measure representation quality do;
    #: diagnostics (dimensional collapse) and tasks kept for context (far-OOD with an inverted score) do not
    ranked: bool = True
    #: where the protocol differs from the paper's behind the reported numbers; None when the card does not say
    #: (user cards may leave it out), () when it states it is exactly the paper's protocol (``deviations = []``)
    deviations: tuple[Deviation, ...] | None = None
    #: the task this one is a protocol variant of (e.g. ``digits_linear_aug`` of ``digits_linear``), or None
    variant_of: str | None = None
    #: role -> the parsed reference, what tasks pass to ``ctx.features`` / ``ctx.dataset`` (parsed from
    #: ``datasets`` when not given)
    refs: dict[str, DatasetRef] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.refs:
            object.__setattr__(self, "refs", {role: DatasetRef.parse(ref) for role, ref in self.datasets.items()})

    @property
    def label(self) -> str:
        """``name@version``, the column header on leaderboards."""
        return f"{self.name}@{self.version}"


@dataclass
class TaskOutput:
    """What a task returns for one seed: scalar metrics, small JSON-able extras for plots and, for the record's
    confidence interval and the leaderboard's paired tests, ``samples``: the main score per test sample
    (``metrics.ScoreSamples`` of one seed, whose ``metric`` is the card's ``main_score``; None when the task has
    none, and then the record has no ``ci95``)."""

    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)
    samples: ScoreSamples | None = None


def classification_samples(metric: str, probs: np.ndarray, labels: np.ndarray) -> ScoreSamples | None:
    """Per-test-sample values [N] whose mean is the classification metric ``metric``, as ``metrics.accuracy`` and
    ``metrics.negative_log_likelihood`` compute it: ``top1`` / ``top5`` (1 when the label is among the most probable
    classes, ties towards the lower class index), ``nll`` (-ln max(p_label, 1e-12)), also with a k-NN suffix
    (``top1_k20``); None for a metric that is not a mean over samples (``ece``). probs [N, C], labels [N]."""
    base = metric.split("_k")[0] if metric.rpartition("_k")[2].isdigit() else metric
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if base in ("top1", "top5"):
        k = min(int(base[3:]), p.shape[1])
        top = np.argsort(-p, axis=1, kind="stable")[:, :k]
        return ScoreSamples.mean(metric, np.any(top == y[:, None], axis=1).astype(np.float64))
    if base == "nll":
        return ScoreSamples.mean(metric, -np.log(np.maximum(p[np.arange(len(y)), y], NLL_CLAMP)))
    return None


class BackboneFace(Protocol):
    """What a task may use of a model (``models.backbone.Backbone`` is one): its spec (``name``,
    ``feature_layer``, ``preprocess``), eval ``transform``, feature layers, its predictive distribution and
    projector when it has them, a trainable copy for fine-tuning, and its view under other preprocessing (which the
    run's feature source makes for ``ctx.features(..., preprocess=...)``). Tasks never look further inside."""

    spec: Any
    transform: Callable[[Any], torch.Tensor]

    @property
    def has_predictive(self) -> bool: ...

    @property
    def has_projector(self) -> bool: ...

    def predictive(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def features(self, images: torch.Tensor, layer: str = "cls") -> torch.Tensor: ...

    def layer_dim(self, layer: str) -> int: ...

    def trainable_copy(self) -> Any: ...

    def with_preprocess(self, preprocess: Any) -> Any: ...


class TaskContext:
    """The one door of a task to the run: the model's face, features through the run's feature source (memo,
    cache, torchrun sharding), datasets, the seed and the run's :class:`EvalSettings`.

    ``feature_fn(ref, layer, preprocess=None)`` and ``dataset_fn(ref)`` receive each reference as a DatasetRef.
    """

    def __init__(self, *, model: BackboneFace, seed: int, settings: EvalSettings,
                 feature_fn: Callable[..., Any], dataset_fn: Callable[[DatasetRef], Any]) -> None:
        self.model = model
        self.seed = seed
        self.settings = settings
        self._feature_fn = feature_fn
        self._dataset_fn = dataset_fn

    @property
    def device(self) -> torch.device:
        return self.settings.device

    @property
    def data_root(self) -> Path | None:
        return self.settings.data_root

    def features(self, ref: DatasetRef | str | Mapping[str, Any], layer: str | None = None, *,
                 preprocess: Any = None) -> Any:
        """Features of dataset ``ref`` in ``layer`` (default: the model's), under the model's eval preprocessing
        or, with ``preprocess``, under that one (e.g. ImageNet-C's no-resize view)."""
        return self._feature_fn(DatasetRef.parse(ref), layer or self.model.spec.feature_layer, preprocess=preprocess)

    def dataset(self, ref: DatasetRef | str | Mapping[str, Any]) -> Any:
        return self._dataset_fn(DatasetRef.parse(ref))

    def rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed * 1000 + offset)


class Task:
    """Base class of a protocol kind. Subclasses set ``kind``, ``Params``, ``roles`` and implement ``run``."""

    kind: ClassVar[str] = ""
    #: dataset roles the card must name (e.g. ("train", "test")) and optional ones
    roles: ClassVar[tuple[str, ...]] = ()
    optional_roles: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.params = self.parse_params(spec)

    @classmethod
    def parse_params(cls, spec: TaskSpec) -> Any:
        names = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(spec.protocol) - names)
        if unknown:
            raise CardError(
                f"Card {spec.card!r}: unknown protocol field(s) {unknown} for kind {cls.kind!r}; allowed {sorted(names)}"
            )
        values = {}
        for key, value in spec.protocol.items():
            if isinstance(value, list):
                value = tuple(value)
            values[key] = value
        try:
            params = cls.Params(**values)
        except (TypeError, ValueError) as exc:
            raise CardError(f"Card {spec.card!r}: bad protocol for kind {cls.kind!r}: {exc}") from None
        cls.check_params(spec, params)
        return params

    @classmethod
    def check_params(cls, spec: TaskSpec, params: Any) -> None:
        """Validate protocol values; raise CardError naming the card and field."""

    def metric_names(self) -> list[str]:
        """Names of the metrics ``run`` returns (``main_score`` must be one of them)."""
        raise NotImplementedError

    def run(self, ctx: TaskContext) -> TaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError


TASK_KINDS: Registry[type[Task]] = Registry("task kind", "prosmin-bench list tasks")


def register_kind(kind: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        cls.kind = kind
        TASK_KINDS.add(kind, cls, origin=f"{cls.__module__}.{cls.__qualname__}")
        return cls

    return deco


_TASK_FIELDS = {
    "name", "kind", "version", "main_score", "suite", "datasets", "protocol", "description", "paper", "ranked",
    "deviations", "variant_of",
}
_DEVIATION_KEYS = ("field", "paper", "ours", "why")


def _deviations(card: cards.Card) -> tuple[Deviation, ...] | None:
    """The card's ``deviations`` array of tables ``{field, paper, ours, why}`` (all non-empty strings); None when
    the card has no such field."""
    raw = cards.field(card, "deviations", list, None)
    if raw is None:
        return None
    where = f"Card {str(card.path)!r}"
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise CardError(
                f"{where}: deviations[{i}] must be a table {{ field = ..., paper = ..., ours = ..., why = ... }}, "
                f"but got {type(entry).__name__} {entry!r}"
            )
        unknown = sorted(set(entry) - set(_DEVIATION_KEYS))
        if unknown:
            raise CardError(f"{where}: deviations[{i}] has unknown key(s) {unknown}; allowed {list(_DEVIATION_KEYS)}")
        for key in _DEVIATION_KEYS:
            if key not in entry:
                raise CardError(f"{where}: deviations[{i}] is missing {key!r}")
            value = entry[key]
            if not isinstance(value, str) or not value.strip():
                raise CardError(f"{where}: deviations[{i}].{key} must be a non-empty string, but got {value!r}")
        out.append(Deviation(**{key: entry[key].strip() for key in _DEVIATION_KEYS}))
    return tuple(out)


def spec_from_card(card: cards.Card) -> TaskSpec:
    cards.check_known_fields(card, _TASK_FIELDS)
    f = lambda key, typ, default=cards._MISSING: cards.field(card, key, typ, default)  # noqa: E731
    version = f("version", int)
    if version < 1:
        raise CardError(f"Card {str(card.path)!r}: field 'version' must be a positive integer, but got {version}")
    suite = f("suite", str)
    if suite not in ("mini", "imagenet"):
        raise CardError(f"Card {str(card.path)!r}: field 'suite' must be 'mini' or 'imagenet', but got {suite!r}")
    datasets = dict(f("datasets", dict))
    refs = {}
    for role, ref in datasets.items():
        if not isinstance(ref, (str, Mapping)):
            raise CardError(f"Card {str(card.path)!r}: field 'datasets.{role}' must be 'name:split' or a table")
        try:
            refs[role] = DatasetRef.parse(ref)
        except DataError as exc:
            raise CardError(f"Card {str(card.path)!r}: field 'datasets.{role}': {exc}") from None
    spec = TaskSpec(
        name=cards.name_field(card, "name"), kind=f("kind", str), version=version, main_score=f("main_score", str),
        suite=suite, datasets=datasets, protocol=dict(f("protocol", dict, {})),
        description=f("description", str, ""), paper=f("paper", str, ""), card=str(card.path), refs=refs,
        ranked=f("ranked", bool, True), deviations=_deviations(card),
        variant_of=cards.name_field(card, "variant_of", None),
    )
    if spec.variant_of == spec.name:
        raise CardError(f"Card {str(card.path)!r}: field 'variant_of' names the task itself; name the task this "
                        "card is a protocol variant of")
    if spec.kind not in TASK_KINDS:
        raise CardError(
            f"Card {str(card.path)!r}: field 'kind' names unknown protocol kind {spec.kind!r}; known: {TASK_KINDS.names()}"
        )
    cls = TASK_KINDS.get(spec.kind)
    missing = [r for r in cls.roles if r not in spec.datasets]
    extra = [r for r in spec.datasets if r not in cls.roles + cls.optional_roles]
    if missing or extra:
        raise CardError(
            f"Card {str(card.path)!r}: field 'datasets' for kind {spec.kind!r} needs roles {list(cls.roles)}"
            f"{' (optional ' + str(list(cls.optional_roles)) + ')' if cls.optional_roles else ''}; "
            f"missing {missing}, unexpected {extra}"
        )
    task = cls(spec)  # validates the protocol
    names = task.metric_names()
    if spec.main_score not in names:
        raise CardError(
            f"Card {str(card.path)!r}: field 'main_score' is {spec.main_score!r}, which kind {spec.kind!r} does "
            f"not report; it reports {names}"
        )
    return spec


@cards.lazy_catalogue
def catalogue() -> Registry[TaskSpec]:
    """Every task: shipped cards and user cards (a name defined twice is an error naming both files)."""
    reg: Registry[TaskSpec] = Registry("task", "prosmin-bench list tasks")
    for card in cards.iter_cards("tasks"):
        spec = spec_from_card(card)
        reg.add(spec.name, spec, origin=str(card.path))
    return reg


def get_task_spec(name: str) -> TaskSpec:
    return catalogue().get(name)


def build_task(spec: TaskSpec) -> Task:
    return TASK_KINDS.get(spec.kind)(spec)
