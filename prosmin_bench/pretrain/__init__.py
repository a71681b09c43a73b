"""Pretraining: ProSMin (and the baselines' methods) with multi-crop augmentation, DDP and resumable checkpoints.

``pretrain(recipe, ...)`` is the one library call behind ``prosmin-bench pretrain`` and
``torchrun -m prosmin_bench pretrain``; recipes are in ``recipes.py``, methods in ``methods/``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from ..errors import ConfigError, PretrainError
from ..paths import folder_write_problem, recipe_checkpoint_path
from . import recipes_baselines  # noqa: F401  (registers the baselines' recipes, derived from prosmin_micro's)
from .config import PretrainConfig, apply_overrides
from .config_checks import validate
from .recipes import RECIPES, Recipe, get_recipe
from .train import run_pretraining


def resolve_config(recipe: str, *, epochs: int | None = None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The recipe's config with ``--epochs`` and ``--set key=value`` overrides applied."""
    cfg = get_recipe(recipe).config
    if epochs is not None:
        if int(epochs) < 1:
            raise ConfigError(f"Expected --epochs to be a positive integer, but got {epochs}")
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=int(epochs)))
    return validate(apply_overrides(cfg, overrides))


def pretrain(recipe: str, *, epochs: int | None = None, out_dir: str | os.PathLike | None = None,
             resume: bool = False, device: str = "auto", overrides: dict[str, Any] | None = None) -> Path:
    """Pretrain with ``recipe``; returns the final checkpoint path.

    Args:
        recipe: a name in ``RECIPES`` (``prosmin_micro``, ``prosmin_vits16_in1k``, ...).
        epochs: overrides the recipe's epochs (schedules span the new length).
        out_dir: folder for ``checkpoint.pt`` and ``log.jsonl``; default
            ``<PROSMIN_BENCH_HOME>/checkpoints/<recipe>/``.
        resume: continue the checkpoint in ``out_dir`` exactly where it stopped (same config required).
        device: ``"auto"`` (CUDA if available, else MPS, else CPU; under torchrun each process's own GPU),
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        overrides: dotted config keys, e.g. ``{"optim.lr": 1e-3, "method.lam": 0.3, "run.max_steps": 10}``.

    Under ``torchrun`` every process calls this; they join one process group (gloo on CPU, NCCL on GPU) and only
    rank 0 writes. The processes stay in the group after the call, so a second call (or an evaluation) in the
    same job reuses it: PyTorch does not reliably create a second default group on torchrun's store after the
    first was destroyed (two of twelve such jobs hung in the second ``init_process_group`` or the barrier after
    it). The group is left when the process exits, or by :func:`prosmin_bench.distributed.destroy`.
    """
    cfg = resolve_config(recipe, epochs=epochs, overrides=overrides)
    folder = Path(out_dir) if out_dir is not None else recipe_checkpoint_path(cfg.recipe).parent
    # What the command line names is checked before any work (building the networks, reading the data).
    resolve_device(device)
    problem = folder_write_problem(folder)
    if problem is not None:
        raise PretrainError(f"Checkpoint folder {str(folder)!r} cannot be written: {problem}; pass a writable "
                            "--out DIR")
    return run_pretraining(cfg, folder, resume=resume, device=device)


__all__ = ["RECIPES", "PretrainConfig", "Recipe", "apply_overrides", "get_recipe", "pretrain", "resolve_config"]
