"""The linear head of a ``linear`` task, reused by the OOD and corruption tasks.

A task names its head with the protocol field ``head_task`` (e.g. ``"digits_linear"``). The head is the one that
task trains: the same train set, the same ``LinearParams``, the same seed and the same class count rule, so
``fit_linear_probe`` finds it in the head cache when the linear task ran first and trains it exactly once otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CardError
from .base import TASK_KINDS, TaskContext, TaskSpec, get_task_spec
from .linear import LinearHead, LinearParams, fit_linear_probe


@dataclass
class SharedHead:
    """A linear task's head and what it was trained with."""

    head: LinearHead
    task: TaskSpec
    params: LinearParams
    num_classes: int

    @property
    def layer(self) -> str:
        return self.params.layer


def linear_task_spec(name: str, card: str) -> tuple[TaskSpec, LinearParams]:
    """The ``linear`` task ``name`` and its parsed params; CardError (naming ``card``) if it is another kind."""
    spec = get_task_spec(name)
    if spec.kind != "linear":
        raise CardError(
            f"Card {card!r}: protocol field 'head_task' must name a task of kind 'linear', but {name!r} is "
            f"{spec.kind!r}"
        )
    return spec, TASK_KINDS.get("linear").parse_params(spec)


def shared_linear_head(ctx: TaskContext, head_task: str, *, card: str, train_ref: Any = None,
                       test_ref: Any = None) -> SharedHead:
    """The head of linear task ``head_task`` for this model and seed.

    ``train_ref`` / ``test_ref``, when given (the calling card's own ``train`` / ``test``), must equal the linear
    task's: a head trained on another set would make the numbers mean something else.
    """
    spec, params = linear_task_spec(head_task, card)
    for role, ref in (("train", train_ref), ("test", test_ref)):
        if ref is not None and ref != spec.datasets[role]:
            raise CardError(
                f"Card {card!r}: datasets.{role} is {ref!r}, but its head_task {head_task!r} uses "
                f"{spec.datasets[role]!r}; they must be the same set"
            )
    train_labels = np.asarray(ctx.features(spec.datasets["train"], params.layer).labels)
    test_labels = np.asarray(ctx.features(spec.datasets["test"], params.layer).labels)
    # The class count rule of LinearTask.run, so the head (cached by class count) is the very same one.
    c = int(max(train_labels.max(), test_labels.max())) + 1
    head = fit_linear_probe(ctx, spec.datasets["train"], params, c)
    return SharedHead(head, spec, params, c)
