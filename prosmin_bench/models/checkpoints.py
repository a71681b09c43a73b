"""What evaluation needs to know about the suite's own pretraining checkpoints: the format marker and version, and
whether the run that wrote one reached its end. ``pretrain/`` writes these checkpoints and takes the marker from
here, so reading one never needs the training code.

A checkpoint is one dict (``pretrain/checkpoint.py`` lists its keys); evaluation reads ``format``,
``format_version``, ``method``, ``config`` (the full pretraining config as a plain dict), ``step``,
``total_steps``, ``online`` and ``target`` (the two networks' state dicts, ``networks.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import WeightsError

#: Marker written into every checkpoint the pretraining module saves.
FORMAT = "prosmin-bench/pretrain"
#: Version of the checkpoint layout; a checkpoint of another version is refused, not guessed at.
FORMAT_VERSION = 1


def check_format(ckpt: Any, source: str = "checkpoint") -> None:
    """Refuse (WeightsError naming ``source``) anything that is not a pretraining checkpoint of this version."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise WeightsError(f"{source} is not a prosmin-bench pretraining checkpoint (no format={FORMAT!r})")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            f"{source} has format_version {ckpt.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )


def interrupted_at(ckpt: Any) -> tuple[int, int] | None:
    """``(step, end)`` of a pretraining checkpoint whose run stopped before the end it was set for (Ctrl-C,
    SIGTERM, a crash: a checkpoint written part-way); ``None`` for a run that reached its end or another format.

    The end is the schedules' last step, or ``run.max_steps`` when the run was asked to stop early: a deliberately
    short run is complete, an interrupted one is not a model to evaluate.
    """
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        return None
    step, total = int(ckpt.get("step", 0)), int(ckpt.get("total_steps", 0))
    max_steps = ((ckpt.get("config") or {}).get("run") or {}).get("max_steps")
    end = total if max_steps is None else min(total, int(max_steps))
    return (step, end) if step < end else None
