"""The public Python API (re-exported by ``prosmin_bench``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import config
from .models import get_model
from .leaderboard.board import newest_versions
from .models.zoo import list_model_names
from .results import ResultRecord, scan
from .suite import evaluate, suite_models, suite_tasks
from .tasks import TaskSpec, get_task_spec, list_task_names

__all__ = ["evaluate", "get_model", "get_task", "list_models", "list_tasks", "load_results"]


def get_task(name: str) -> TaskSpec:
    """The parsed card of a registered task (``digits_knn``, ``imagenet_c``, ...)."""
    return get_task_spec(name)


def list_models(scale: str | None = None) -> list[str]:
    """Registered model names (optionally only ``"mini"`` or ``"imagenet"`` scale). Touches no checkpoint."""
    return list_model_names() if scale is None else suite_models(scale)


def list_tasks(suite: str | None = None) -> list[str]:
    """Registered task names (optionally only one suite). Touches no dataset."""
    return list_task_names() if suite is None else suite_tasks(suite)


def load_results(path: str | os.PathLike | None = None) -> Any:
    """A pandas DataFrame with one row per (model, task, metric, seed) from the result files under ``path`` (default:
    the folder ``run`` writes to, ``$PROSMIN_BENCH_HOME/results``; the committed records are
    ``leaderboards/results`` of a checkout).

    Columns: model, task, task_version, task_kind, suite, metric, seed, value, main_score (True on the task's
    main metric), current (False for records of an older task version than the newest under ``path``: never
    average those with current ones), weights_sha256. Rows are sorted by model, task, metric and seed. Error
    records and unreadable files are skipped (the leaderboard lists them).

    >>> import tempfile
    >>> from prosmin_bench import load_results
    >>> load_results(tempfile.mkdtemp()).columns.tolist()[:4]
    ['model', 'task', 'task_version', 'task_kind']
    """
    import pandas as pd  # here, not at the top: it takes a second to import and nothing else needs it

    records, _ = scan(Path(path) if path is not None else config.default_results_dir())
    results = [r for r in records if isinstance(r, ResultRecord)]
    newest = newest_versions(results)
    rows = []
    for r in results:
        for seed in r.seeds:
            for metric, value in r.per_seed.get(str(seed), {}).items():
                rows.append({
                    "model": r.model, "task": r.task, "task_version": int(r.task_version), "task_kind": r.task_kind,
                    "suite": r.suite, "metric": metric, "seed": int(seed), "value": float(value),
                    "main_score": metric == r.main_score, "current": r.task_version == newest[r.task],
                    "weights_sha256": r.weights_sha256,
                })
    cols = ["model", "task", "task_version", "task_kind", "suite", "metric", "seed", "value", "main_score", "current",
            "weights_sha256"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["model", "task", "metric", "seed"], kind="stable").reset_index(drop=True)
