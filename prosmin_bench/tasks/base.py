"""Tasks: one class per protocol kind, and what a task sees of the run.

A task card names a protocol ``kind``, its datasets, protocol parameters, ``main_score``, ``suite`` and
``version`` (bump it whenever a change moves the numbers); cards are parsed in :mod:`.spec`, which needs no torch.
Each kind is a small class registered with ``@register_kind`` holding a typed ``Params`` dataclass (the protocol's
defaults, each with its source) and one method, ``run(ctx) -> TaskOutput``, called once per seed.
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

from ..data.base import DatasetRef
from ..errors import CardError
from ..metrics import ScoreSamples
from ..metrics.classification import NLL_CLAMP
from ..settings import EvalSettings
# Card parsing, the catalogue and the kind registry live in .spec (no torch); importable from here as before.
from .spec import (  # noqa: F401
    _TASK_FIELDS, TASK_KINDS, Deviation, TaskSpec, build_task, catalogue, get_task_spec, register_kind, spec_from_card,
)

log = logging.getLogger(__name__)


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
