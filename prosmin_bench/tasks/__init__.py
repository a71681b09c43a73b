"""Task kinds (one module each) and the task catalogue built from ``tasks/*.toml`` cards.

Importing this package loads no kind module and no torch (so ``prosmin-bench list tasks`` answers at once): cards
are read by :mod:`.spec`, and a kind's module is imported when a task of that kind is checked or built.
"""

from __future__ import annotations

from typing import Any

from .spec import TASK_KINDS, TaskSpec, build_task, catalogue, get_task_spec, register_kind

__all__ = ["TASK_KINDS", "Task", "TaskContext", "TaskOutput", "TaskSpec", "build_task", "catalogue", "get_task_spec",
           "register_kind", "list_task_names"]

#: Names of :mod:`.base` (which imports torch) served on first access.
_FROM_BASE = ("Task", "TaskContext", "TaskOutput")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def list_task_names() -> list[str]:
    return catalogue().names()
