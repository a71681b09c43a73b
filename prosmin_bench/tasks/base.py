"""Tasks: declarative cards (TOML) + one class per protocol kind.

A task card names a protocol ``kind``, its datasets, protocol parameters, ``main_score``, ``suite`` and
``version`` (bump it whenever a change moves the numbers). Each kind is a small class registered with
``@register_kind`` holding a typed ``Params`` dataclass (the protocol's defaults, each with its source) and one
method, ``run(ctx) -> TaskOutput``, called once per seed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .. import cards
from ..errors import CardError
from ..registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """One task card, parsed."""

    name: str
    kind: str
    version: int
    main_score: str
    suite: str
    datasets: dict[str, Any]
    protocol: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    paper: str = ""
    card: str = ""

    @property
    def label(self) -> str:
        """``name@version``, the column header on leaderboards."""
        return f"{self.name}@{self.version}"


@dataclass
class TaskOutput:
    """What a task returns for one seed: scalar metrics and small JSON-able extras for plots."""

    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


class TaskContext:
    """What a task may use: the model, features through the cache, datasets, the seed, the device.

    Tasks never look inside a model: they call ``features(...)`` (or, for fine-tuning kinds, ``model`` as a
    Backbone whose ``.net`` they copy and train).
    """

    def __init__(self, *, model: Any, seed: int, device: torch.device, data_root: Path | None,
                 feature_fn: Callable[..., Any], dataset_fn: Callable[..., Any], options: Any = None) -> None:
        self.model = model
        self.seed = seed
        self.device = device
        self.data_root = data_root
        self._feature_fn = feature_fn
        self._dataset_fn = dataset_fn
        self.options = options

    def features(self, ref: Any, layer: str | None = None, **kwargs: Any):
        """Features of dataset ``ref`` ("name:split" or a source table) in ``layer`` (default: the model's)."""
        return self._feature_fn(ref, layer or self.model.spec.feature_layer, **kwargs)

    def dataset(self, ref: Any):
        return self._dataset_fn(ref)

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


_TASK_FIELDS = {"name", "kind", "version", "main_score", "suite", "datasets", "protocol", "description", "paper"}


def spec_from_card(card: cards.Card) -> TaskSpec:
    cards.check_known_fields(card, _TASK_FIELDS)
    f = lambda key, typ, default=cards._MISSING: cards.field(card, key, typ, default)  # noqa: E731
    version = f("version", int)
    if version < 1:
        raise CardError(f"Card {str(card.path)!r}: field 'version' must be a positive integer, but got {version}")
    suite = f("suite", str)
    if suite not in ("mini", "imagenet"):
        raise CardError(f"Card {str(card.path)!r}: field 'suite' must be 'mini' or 'imagenet', but got {suite!r}")
    spec = TaskSpec(
        name=cards.name_field(card, "name"), kind=f("kind", str), version=version, main_score=f("main_score", str),
        suite=suite,
        datasets=dict(f("datasets", dict)), protocol=dict(f("protocol", dict, {})),
        description=f("description", str, ""), paper=f("paper", str, ""), card=str(card.path),
    )
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
    for role, ref in spec.datasets.items():
        if not isinstance(ref, (str, Mapping)):
            raise CardError(f"Card {str(card.path)!r}: field 'datasets.{role}' must be 'name:split' or a table")
    task = cls(spec)  # validates the protocol
    names = task.metric_names()
    if spec.main_score not in names:
        raise CardError(
            f"Card {str(card.path)!r}: field 'main_score' is {spec.main_score!r}, which kind {spec.kind!r} does "
            f"not report; it reports {names}"
        )
    return spec


_lock = threading.Lock()
_catalogue: Registry[TaskSpec] | None = None


@cards.on_change
def _reset() -> None:
    global _catalogue
    _catalogue = None


def catalogue() -> Registry[TaskSpec]:
    global _catalogue
    with _lock:
        if _catalogue is None:
            reg: Registry[TaskSpec] = Registry("task", "prosmin-bench list tasks")
            for card in cards.iter_cards("tasks"):
                spec = spec_from_card(card)
                reg.add(spec.name, spec, origin=str(card.path))
            _catalogue = reg
        return _catalogue


def get_task_spec(name: str) -> TaskSpec:
    return catalogue().get(name)


def build_task(spec: TaskSpec) -> Task:
    return TASK_KINDS.get(spec.kind)(spec)
