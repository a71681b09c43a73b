"""Task kinds (one module each) and the task catalogue built from ``tasks/*.toml`` cards."""

from __future__ import annotations

from . import knn, linear  # noqa: F401  (register kinds)
from . import corruption, lowshot, ood, semisup, transfer  # noqa: F401  (register kinds)
from . import collapse  # noqa: F401  (register kind)
from . import linear_aug  # noqa: F401  (register kind)
from .base import TASK_KINDS, Task, TaskContext, TaskOutput, TaskSpec, build_task, catalogue, get_task_spec, register_kind

__all__ = ["TASK_KINDS", "Task", "TaskContext", "TaskOutput", "TaskSpec", "build_task", "catalogue", "get_task_spec",
           "register_kind", "list_task_names"]


def list_task_names() -> list[str]:
    return catalogue().names()
