"""The public Python API (re-exported by ``prosmin_bench``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import config, progress, suite
from .models import get_model
from .leaderboard.board import newest_versions
from .models.zoo import list_model_names
from .results import Record, ResultRecord, scan
from .suite import suite_models, suite_tasks
from .tasks import TaskSpec, get_task_spec, list_task_names

__all__ = ["Results", "evaluate", "get_model", "get_task", "list_models", "list_tasks", "load_results"]

#: The tidy columns of ``Results.to_frame()`` and ``load_results()`` (which adds ``current`` before the last).
_COLUMNS = ["model", "task", "task_version", "task_kind", "suite", "metric", "seed", "value", "main_score",
            "weights_sha256"]


def _rows(results: Iterable[ResultRecord]) -> list[dict[str, Any]]:
    """One dict per (record, seed, metric) of result records."""
    return [{"model": r.model, "task": r.task, "task_version": int(r.task_version), "task_kind": r.task_kind,
             "suite": r.suite, "metric": metric, "seed": int(seed), "value": float(value),
             "main_score": metric == r.main_score, "weights_sha256": r.weights_sha256}
            for r in results for seed in r.seeds for metric, value in r.per_seed.get(str(seed), {}).items()]


class Results(list):
    """The records ``evaluate`` returns (a list: one ResultRecord or ErrorRecord per (model, task))."""

    @property
    def errors(self) -> list[Record]:
        """The ErrorRecords (``.message`` says what failed)."""
        return [r for r in self if not isinstance(r, ResultRecord)]

    def to_frame(self) -> Any:
        """A tidy pandas DataFrame, one row per (model, task, seed, metric) of the result records, sorted by model,
        task, metric and seed; columns model, task, task_version, task_kind, suite, metric, seed, value,
        main_score (True on the task's main metric), weights_sha256. Error records have no rows (see ``errors``)."""
        import pandas as pd  # here, not at the top: it takes a second to import

        df = pd.DataFrame(_rows(r for r in self if isinstance(r, ResultRecord)), columns=_COLUMNS)
        return df.sort_values(["model", "task", "metric", "seed"], kind="stable").reset_index(drop=True)


@contextlib.contextmanager
def _notebook_output(quiet: bool) -> Iterator[None]:
    """While ``evaluate`` runs: progress as the package's policy says (:mod:`prosmin_bench.progress`: widgets in
    Jupyter, bars in a terminal, a log line every 30 s elsewhere), none with ``quiet``; and, when neither the
    ``prosmin_bench`` logger nor the root logger has a handler, INFO lines (WARNING with ``quiet``) on stderr; a
    logging set-up of the caller's own is left as it is."""
    logger = logging.getLogger("prosmin_bench")
    handler = None
    level = logger.level
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        with progress.using("off" if quiet else progress.mode()):
            yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)


def evaluate(
    models: Any, tasks: str | Iterable[str], *, transform: Callable[[Any], Any] | None = None, name: str | None = None,
    data_root: str | os.PathLike | None = None, seeds: Sequence[int] = (0,), device: str = "auto",
    results_dir: str | os.PathLike | None = None, overwrite: bool = False, options: Any = None, quiet: bool = False,
) -> Results:
    """Evaluate every model on every task; the records (new or reused) as :class:`Results` (``.to_frame()``).

    Args:
        models: registered names (``prosmin_micro``, ``timm:<name>.<tag>``, ``module:<python.path>:<callable>``),
            ModelSpecs, Backbones, or your own ``nn.Module`` mapping images [B, 3, H, W] to features [B, D].
        tasks: task names (``digits_knn``, a card of yours under ``--cards`` / ``cards.add_card_dir``).
        transform: PIL image -> tensor [3, H, W] for the one nn.Module (default: the tasks' standard preprocessing
            at the module's input size); stated in the record.
        name: the name of the nn.Module's records (letters, digits and _ . + -).
        data_root: the folder of the datasets that are files (ImageNet, image folders of task cards).
        quiet: no progress and only warnings in the log (else INFO lines on stderr when logging is not configured,
            and progress bars or lines: :mod:`prosmin_bench.progress`).
        seeds, device, results_dir, overwrite, options: as :func:`prosmin_bench.runner.evaluate`.
    """
    with _notebook_output(quiet):
        return Results(suite.evaluate(models, tasks, transform=transform, name=name, data_root=data_root, seeds=seeds,
                                      device=device, results_dir=results_dir, overwrite=overwrite, options=options))


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
    rows = [{**row, "current": row["task_version"] == newest[row["task"]]} for row in _rows(results)]
    df = pd.DataFrame(rows, columns=_COLUMNS[:-1] + ["current", "weights_sha256"])
    return df.sort_values(["model", "task", "metric", "seed"], kind="stable").reset_index(drop=True)
