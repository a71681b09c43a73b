"""Pretraining checkpoints: one dict, saved atomically, loadable with ``torch.load(weights_only=True)``.

Keys (evaluation reads them through ``models/checkpoints.py``, ``models/converters.py`` and
``models/networks.py``, which own the format marker): ``format`` = ``"prosmin-bench/pretrain"``,
``format_version``, ``recipe``, ``method``, ``arch``, ``arch_kwargs``, ``config`` (the full typed config as a
plain dict), ``step`` (optimiser steps done), ``total_steps``, ``steps_per_epoch``, ``epoch``, ``finished``,
``target`` (EMA network state dict: ``backbone.*``, ``head.*``), ``online`` (``backbone.*``, ``head.*``,
``predictor.*``), ``method_state`` (e.g. ProSMin's ``center``), ``optimizer``, ``scaler``, ``schedules`` (the
step and the lr / weight decay / momentum used at the last step), ``rng`` (every process's generator states,
in rank order), ``world_size``, ``versions``. Only tensors, plain containers, numbers, strings and None.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import WeightsError
from ..models.checkpoints import FORMAT, FORMAT_VERSION, check_format


def rng_state() -> dict[str, Any]:
    """This process's generator states: torch CPU, CUDA (all devices), Python ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    return state


def seed_rngs(seed: int) -> None:
    """Seed every generator :func:`rng_state` saves (torch and Python ``random``), so a run's checkpoints are a
    function of its config alone: the same run twice writes byte-identical files, whose sha256 the result
    records key on."""
    torch.manual_seed(seed)
    random.seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``: a crash mid-write never
    leaves a truncated checkpoint, and the previous one stays until the new one is complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a pretraining checkpoint on CPU with ``weights_only=True``; raise WeightsError if it is not one."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"Checkpoint {str(path)!r} does not exist") from None
    except Exception as exc:  # truncated, not a torch file, unsafe pickle
        raise WeightsError(
            f"Checkpoint {str(path)!r} is truncated or not a prosmin-bench pretraining checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None
    check_format(ckpt, str(path))
    return ckpt


# The format marker is the models' (they read these checkpoints); the training loop writes it from here.
__all__ = ["FORMAT", "FORMAT_VERSION", "check_format", "load", "rng_state", "save_atomic", "seed_rngs",
           "set_rng_state"]
