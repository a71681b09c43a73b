"""Where evaluation meets pretraining: the suites, and the models the mini suite makes for itself.

- :func:`select`: which models, tasks and seeds ``prosmin-bench run`` means (nothing named: the mini suite;
  ``--model X`` alone: every task of X's suite; seeds 0, 1, 2 for the mini suite, else 0).
- :func:`evaluate` (``prosmin_bench.evaluate``): the runner's ``evaluate`` with the suite's weights policy
  (:func:`ensure_weights`): a mini-scale model made by a recipe whose checkpoint is missing is pretrained first,
  one whose pretraining was interrupted is finished first, and one pretrained with a recipe that has changed since
  is evaluated as it is, with a warning naming the changed fields.

The runner evaluates what it is given and never trains; it calls :func:`ensure_weights` through its
``prepare_weights`` hook, so only this module (and the CLI and API above it) imports ``pretrain``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import distributed
from .errors import ProsminBenchError, WeightsError
from .models import ModelSpec
from .models.custom import MODULE_PREFIX
from .models.checkpoints import check_format, interrupted_at
from .models.shipped import shipped_checkpoint
from .models.weights import interrupted_message, load_checkpoint_file, remake_advice, weights_dir_candidates
from .models.zoo import catalogue as model_catalogue
from .models.zoo import get_model_spec
from .paths import recipe_checkpoint_path
from .pretrain import pretrain, resolve_config
from .pretrain.train import config_differences
from .results import Record
from .runner import RunOptions
from .runner import evaluate as run_evaluation
from .tasks import catalogue as task_catalogue

log = logging.getLogger(__name__)

#: Seeds of a run of the mini suite (mean and std over three cost little there); other runs default to one.
MINI_SEEDS = (0, 1, 2)


def suite_models(suite: str) -> list[str]:
    """The registered models of ``suite`` ("mini" or "imagenet"), sorted by name."""
    return [n for n, s in model_catalogue().items() if s.scale == suite]


def suite_tasks(suite: str) -> list[str]:
    """The registered tasks of ``suite``, sorted by name."""
    return [n for n, s in task_catalogue().items() if s.suite == suite]


@dataclass(frozen=True)
class Selection:
    """What a run evaluates: ``models`` x ``tasks``; ``suite`` (None for a mix) picks the leaderboard page and the
    default ``seeds``."""

    models: list[str]
    tasks: list[str]
    suite: str | None
    seeds: tuple[int, ...]


def select(models: Sequence[str] = (), tasks: Sequence[str] = (), suite: str | None = None) -> Selection:
    """The models and tasks of ``prosmin-bench run [--model M]... [--task T]... [--suite S]``.

    Nothing named: the mini suite. ``--suite S``: every task of S and, without ``--model``, every model of S.
    ``--model`` without ``--task``: every task of the models' own suite (mini models -> digits tasks), when they
    share one. Raises ProsminBenchError when that leaves no model or no task.
    """
    suite = suite or (None if (models or tasks) else "mini")
    if suite is None and models and not tasks:
        scales = {get_model_spec(m).scale for m in models if not m.startswith(MODULE_PREFIX)}
        if len(scales) == 1:
            suite = scales.pop()
    model_list = list(models) or (suite_models(suite) if suite else [])
    task_list = list(tasks) or (suite_tasks(suite) if suite else [])
    if not model_list:
        raise ProsminBenchError("No model given: pass --model NAME (see `prosmin-bench list models`) or --suite")
    if not task_list:
        raise ProsminBenchError("No task given: pass --task NAME (see `prosmin-bench list tasks`) or --suite")
    return Selection(model_list, task_list, suite, MINI_SEEDS if suite == "mini" else (0,))


def evaluate(
    models: Any, tasks: str | Iterable[str], *, transform: Callable[[Any], Any] | None = None, name: str | None = None,
    data_root: str | Path | None = None, seeds: Sequence[int] = (0,), device: str = "auto",
    results_dir: str | Path | None = None, overwrite: bool = False, options: RunOptions | None = None,
) -> list[Record]:
    """Evaluate every model on every task; returns the records (new or reused), one per (model, task).

    ``models``: names, ModelSpecs, Backbones, or your own ``nn.Module`` (images [B, 3, H, W] -> features [B, D])
    with ``name=`` and optionally ``transform=`` (PIL image -> tensor). As :func:`prosmin_bench.runner.evaluate`
    (which documents the arguments), and a mini-scale model made by a
    recipe is pretrained first when its checkpoint is missing or was interrupted (not with
    ``options.pretrain_missing = False``, ``--weights`` or a checkpoint in ``--weights-dir``).
    """
    return run_evaluation(models, tasks, seeds=seeds, device=device, results_dir=results_dir, overwrite=overwrite,
                          options=options, prepare_weights=ensure_weights, transform=transform, name=name,
                          data_root=data_root)


def ensure_weights(spec: ModelSpec, opts: RunOptions) -> None:
    """Pretrain a mini-scale recipe model whose checkpoint is missing, or finish one whose pretraining was
    interrupted (the default suite makes its own models; a part-way checkpoint is never evaluated as the model).

    One process at a time per recipe: a second run that needs the same model waits for the first's pretraining,
    then uses its checkpoint (two runs pretraining into one folder would overwrite each other's checkpoints).
    """
    if not (opts.pretrain_missing and spec.weights.recipe and spec.scale == "mini" and opts.weights is None):
        return
    if any(p.is_file() for p in weights_dir_candidates(spec, opts.weights_dir)):
        return  # get_model loads the given file (and refuses it if it is interrupted)
    recipe = spec.weights.recipe
    path = recipe_checkpoint_path(recipe)
    if opts.shipped and not path.is_file() and _shipped_is_current(recipe):
        return  # get_model loads the checkpoint shipped in the package (models/shipped.py)
    # Under torchrun every rank pretrains together: rank 0 alone holds the lock and tells the others what to do.
    with _recipe_lock(recipe) if distributed.is_main() else contextlib.nullcontext():
        state: Any = None
        if distributed.is_main():
            try:
                state = _recipe_checkpoint_state(recipe, path)
            except (ProsminBenchError, OSError) as exc:
                state = exc  # every rank raises it, none waits for a pretraining that will not start
        state = distributed.broadcast_object(state)
        if isinstance(state, BaseException):
            raise state
        if state == "done":
            _warn_if_recipe_changed(recipe, path)
            return
        if state == "missing":
            log.info("pretraining %s (recipe %s): no checkpoint yet", spec.name, recipe)
        else:
            log.info("%s (recipe %s): its pretraining was interrupted at step %d of %d; resuming it", spec.name,
                     recipe, *state)
        pretrain(recipe, device=opts.device, resume=True)


def _shipped_is_current(recipe: str) -> bool:
    """Whether the package ships a checkpoint of ``recipe`` pretrained with the recipe as it is defined now (else it
    is pretrained here, with a warning naming what changed; tests/test_shipped.py keeps the shipped ones current)."""
    shipped = shipped_checkpoint(recipe)
    if shipped is None:
        return False
    ckpt = load_checkpoint_file(shipped, remake=remake_advice(recipe, shipped, automatic=True))
    diffs = config_differences(ckpt["config"], resolve_config(recipe).to_dict())
    if diffs:
        log.warning("the checkpoint of recipe %s shipped in the package was made with another config (%s); "
                    "pretraining the recipe here instead", recipe, "; ".join(diffs[:3]))
        return False
    log.info("recipe %s: using the checkpoint shipped in the package (%s); `prosmin-bench pretrain --recipe %s` "
             "makes it here instead", recipe, shipped, recipe)
    return True


@contextlib.contextmanager
def _recipe_lock(recipe: str) -> Iterator[None]:
    """One process at a time pretrains ``recipe`` into its checkpoint folder (a file lock in that folder)."""
    folder = recipe_checkpoint_path(recipe).parent
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / "pretrain.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is pretraining recipe %s (lock %s)", recipe, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _recipe_checkpoint_state(recipe: str, path: Path) -> str | tuple[int, int]:
    """``"missing"``, ``"done"``, or ``(step, end)`` of an interrupted pretraining that will be resumed.

    A checkpoint that cannot be read (truncated) or cannot be resumed (made with other settings) is an error that
    says how to make it again; it is never deleted here.
    """
    if not path.is_file():
        return "missing"
    ckpt = load_checkpoint_file(path, remake=remake_advice(recipe, path, automatic=True))
    try:
        check_format(ckpt, repr(str(path)))
    except WeightsError as exc:
        raise WeightsError(f"{exc}; {remake_advice(recipe, path, automatic=True)}") from None
    where = interrupted_at(ckpt)
    if where is None:
        return "done"
    diffs = config_differences(ckpt["config"], resolve_config(recipe).to_dict())
    if diffs:  # resuming it as the recipe would mix two configs in one model
        raise WeightsError(
            f"{interrupted_message(ckpt, path, other_settings=True)}, or move {str(path.parent)!r} away to let "
            f"`run` pretrain recipe {recipe} anew (the checkpoint differs from it in {', '.join(diffs[:4])})"
        )
    return where


#: Run settings that do not change what a pretraining run computes.
_EXECUTION_ONLY = ("run.checkpoint_every_steps", "run.log_every_steps", "run.monitor_every",
                   "run.collapse_warn_fraction", "data.num_workers", "data.data_root")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def recipe_differences(recipe: str, checkpoint: Path) -> list[str]:
    """Fields where the config saved beside ``checkpoint`` (``config.json``) differs from ``recipe`` as it is
    defined now, as ``"key: checkpoint value -> recipe value"``; ``[]`` when they agree or nothing was saved."""
    saved_path = checkpoint.parent / "config.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return []
    now, then = _flatten(resolve_config(recipe).to_dict()), _flatten(saved)
    keys = sorted((set(now) | set(then)) - set(_EXECUTION_ONLY))
    return [f"{k}: {then.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in keys if now.get(k) != then.get(k)]


def _warn_if_recipe_changed(recipe: str, checkpoint: Path) -> None:
    diffs = recipe_differences(recipe, checkpoint)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        log.warning(
            "%s was pretrained with a config that differs from recipe %s as it is now (%s); its results describe "
            "that checkpoint. To evaluate the current recipe, move the checkpoint's folder %s away and run again",
            checkpoint, recipe, shown, checkpoint.parent,
        )
