"""The public Python API (re-exported by ``prosmin_bench``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .models import get_model
from .models.zoo import get_model_spec, list_model_names
from .runner import evaluate
from .tasks import TaskSpec, get_task_spec, list_task_names

__all__ = ["evaluate", "get_model", "get_task", "list_models", "list_tasks", "load_results"]


def get_task(name: str) -> TaskSpec:
    """The parsed card of a registered task (``digits_knn``, ``imagenet_c``, ...)."""
    return get_task_spec(name)


def list_models(scale: str | None = None) -> list[str]:
    """Registered model names (optionally only ``"mini"`` or ``"imagenet"`` scale). Touches no checkpoint."""
    names = list_model_names()
    return [n for n in names if scale is None or get_model_spec(n).scale == scale]


def list_tasks(suite: str | None = None) -> list[str]:
    """Registered task names (optionally only one suite). Touches no dataset."""
    names = list_task_names()
    return [n for n in names if suite is None or get_task_spec(n).suite == suite]


def load_results(path: str | os.PathLike = "leaderboards/results") -> Any:
    """A pandas DataFrame with one row per (model, task, metric, seed) from the result files under ``path``.

    Columns: model, task, task_version, suite, metric, seed, value, main_score (bool), weights_sha256.
    Error records and unreadable files are skipped (the leaderboard lists them).
    """
    import pandas as pd

    from .results import ResultRecord, scan

    records, _ = scan(Path(path))
    rows = []
    for r in records:
        if not isinstance(r, ResultRecord):
            continue
        for seed in r.seeds:
            for metric, value in sorted(r.per_seed.get(str(seed), {}).items()):
                rows.append({
                    "model": r.model, "task": r.task, "task_version": r.task_version, "suite": r.suite,
                    "metric": metric, "seed": int(seed), "value": float(value),
                    "main_score": metric == r.main_score, "weights_sha256": r.weights_sha256,
                })
    cols = ["model", "task", "task_version", "suite", "metric", "seed", "value", "main_score", "weights_sha256"]
    return pd.DataFrame(rows, columns=cols)
