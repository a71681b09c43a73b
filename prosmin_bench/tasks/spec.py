"""Task cards, parsed, and the task catalogue: what can be read without importing torch.

A task card names a protocol ``kind``, its datasets, protocol parameters, ``main_score``, ``suite`` and
``version``. The shipped kinds are known here by name (:data:`KIND_MODULES`, kind -> the module that defines it,
checked against the real registrations by ``tests/test_light_commands.py``); a kind's module (and with it torch) is
imported the first time a task of that kind is checked or built, as timm's lazy model entry points do. So
``prosmin-bench list tasks`` reads the cards (:func:`task_index`) without torch, and :func:`catalogue` adds the checks
only a kind can make (dataset roles, protocol fields, ``main_score``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import cards
from ..errors import CardError, DataError
from ..registry import Registry

if TYPE_CHECKING:
    from ..data.base import DatasetRef
    from .base import Task

#: The shipped protocol kinds and the module of this package that registers each (imported on first use).
KIND_MODULES: dict[str, str] = {
    "collapse": "collapse", "corruption": "corruption", "knn": "knn", "linear": "linear",
    "linear_aug": "linear_aug", "lowshot": "lowshot", "ood": "ood", "semisup": "semisup",
    "transfer_finetune": "transfer",
}


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
            from ..data.base import DatasetRef  # here: the data layer imports torch, which reading cards must not

            object.__setattr__(self, "refs", {role: DatasetRef.parse(ref) for role, ref in self.datasets.items()})

    @property
    def label(self) -> str:
        """``name@version``, the column header on leaderboards."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class TaskEntry:
    """A task card as ``prosmin-bench list tasks`` shows it: its card-level fields, checked without importing the
    kind's module (:func:`catalogue` holds the fully checked :class:`TaskSpec`)."""

    name: str
    kind: str
    version: int
    suite: str
    main_score: str
    card: str


class KindRegistry(Registry["type[Task]"]):
    """The task-kind registry: kinds registered with :func:`register_kind`, plus the shipped kinds of
    :data:`KIND_MODULES`, which count as known from the start and are registered by importing their module the first
    time one is looked up."""

    def __init__(self, modules: Mapping[str, str]) -> None:
        super().__init__("task kind", "prosmin-bench list tasks")
        self._modules = dict(modules)

    def _load(self, name: str) -> None:
        if name in self._modules and name not in self._items:
            importlib.import_module(f"{__package__}.{self._modules[name]}")

    def add(self, name: str, item: Any, *, origin: str = "", replace: bool = False) -> Any:
        # A shipped kind's name taken elsewhere is a duplicate even before the shipped module is imported: import it
        # now, so the error names both places as it did when every kind module was imported up front.
        if not replace and getattr(item, "__module__", None) != f"{__package__}.{self._modules.get(name)}":
            self._load(name)
        return super().add(name, item, origin=origin, replace=replace)

    def get(self, name: str) -> Any:
        self._load(name)
        return super().get(name)

    def unknown_message(self, name: str) -> str:
        for kind in self._modules:  # the close matches come from every kind, registered or not yet imported
            self._load(kind)
        return super().unknown_message(name)

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._modules))

    def items(self) -> list[tuple[str, Any]]:
        for kind in self._modules:
            self._load(kind)
        return super().items()

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._modules

    def __len__(self) -> int:
        return len(self.names())


TASK_KINDS: KindRegistry = KindRegistry(KIND_MODULES)


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


def _card_fields(card: cards.Card) -> dict[str, Any]:
    """The card's fields as :class:`TaskSpec` arguments (all but ``refs``), with every check that needs no kind
    module: known fields, types, version, suite, names, deviations, and that the kind exists."""
    cards.check_known_fields(card, _TASK_FIELDS)
    f = lambda key, typ, default=cards._MISSING: cards.field(card, key, typ, default)  # noqa: E731
    version = f("version", int)
    if version < 1:
        raise CardError(f"Card {str(card.path)!r}: field 'version' must be a positive integer, but got {version}")
    suite = f("suite", str)
    if suite not in ("mini", "imagenet"):
        raise CardError(f"Card {str(card.path)!r}: field 'suite' must be 'mini' or 'imagenet', but got {suite!r}")
    datasets = dict(f("datasets", dict))
    for role, ref in datasets.items():
        if not isinstance(ref, (str, Mapping)):
            raise CardError(f"Card {str(card.path)!r}: field 'datasets.{role}' must be 'name:split' or a table")
    fields = dict(
        name=cards.name_field(card, "name"), kind=f("kind", str), version=version, main_score=f("main_score", str),
        suite=suite, datasets=datasets, protocol=dict(f("protocol", dict, {})),
        description=f("description", str, ""), paper=f("paper", str, ""), card=str(card.path),
        ranked=f("ranked", bool, True), deviations=_deviations(card),
        variant_of=cards.name_field(card, "variant_of", None),
    )
    if fields["variant_of"] == fields["name"]:
        raise CardError(f"Card {str(card.path)!r}: field 'variant_of' names the task itself; name the task this "
                        "card is a protocol variant of")
    if fields["kind"] not in TASK_KINDS:
        raise CardError(
            f"Card {str(card.path)!r}: field 'kind' names unknown protocol kind {fields['kind']!r}; "
            f"known: {TASK_KINDS.names()}"
        )
    return fields


def spec_from_card(card: cards.Card) -> TaskSpec:
    """The card as a fully checked TaskSpec (imports its kind's module: the kind checks roles, protocol and
    ``main_score``)."""
    from ..data.base import DatasetRef  # the data layer imports torch; the kind's module does anyway

    fields = _card_fields(card)
    refs = {}
    for role, ref in fields["datasets"].items():
        try:
            refs[role] = DatasetRef.parse(ref)
        except DataError as exc:
            raise CardError(f"Card {str(card.path)!r}: field 'datasets.{role}': {exc}") from None
    spec = TaskSpec(**fields, refs=refs)
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
    """Every task: shipped cards and user cards (a name defined twice is an error naming both files), each checked by
    its kind (imports the kinds' modules, and so torch)."""
    reg: Registry[TaskSpec] = Registry("task", "prosmin-bench list tasks")
    for card in cards.iter_cards("tasks"):
        spec = spec_from_card(card)
        reg.add(spec.name, spec, origin=str(card.path))
    return reg


@cards.lazy_catalogue
def task_index() -> Registry[TaskEntry]:
    """Every task card with its card-level checks only (no kind module, no torch): what ``list tasks`` shows."""
    reg: Registry[TaskEntry] = Registry("task", "prosmin-bench list tasks")
    for card in cards.iter_cards("tasks"):
        f = _card_fields(card)
        entry = TaskEntry(name=f["name"], kind=f["kind"], version=f["version"], suite=f["suite"],
                          main_score=f["main_score"], card=f["card"])
        reg.add(entry.name, entry, origin=str(card.path))
    return reg


def get_task_spec(name: str) -> TaskSpec:
    return catalogue().get(name)


def build_task(spec: TaskSpec) -> Task:
    return TASK_KINDS.get(spec.kind)(spec)
