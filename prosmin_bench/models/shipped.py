"""Micro checkpoints shipped in the package, so that the mini suite's first run evaluates instead of pretraining.

``prosmin_bench/_checkpoints/<recipe>.pt`` is the final checkpoint of ``prosmin-bench pretrain --recipe <recipe>``
made on this project's 2-core CPU machine, with the state only resuming needs removed (optimizer, gradient scaler,
RNG; :data:`RESUME_ONLY`), the network no registered model evaluates emptied (DINO's and iBOT's student, MoCo-v3's
momentum encoder: half the size), and a ``shipped`` entry saying where it came from. The networks kept are the
pretraining's, bit for bit, so a record of the shipped file has the ``weights_sha256`` of the checkpoint it was cut
from.

A shipped checkpoint is the last candidate for a recipe model's weights (``models/weights.py``): after
``--weights-dir`` and after ``<home>/checkpoints/<recipe>/checkpoint.pt``, so one made here by ``prosmin-bench
pretrain --recipe NAME`` always wins, and ``prosmin-bench run --no-shipped`` pretrains the missing ones here
instead. ``tests/test_shipped.py`` checks that every shipped checkpoint holds its recipe's config as defined now
(a recipe changed without remaking its checkpoint fails CI), and re-pretrains one recipe and compares the k-NN
accuracy of the result with the shipped checkpoint's.

Remake them after pretraining each recipe into a home folder::

    PROSMIN_BENCH_HOME=<home> prosmin-bench pretrain --recipe prosmin_micro   # ... each of SHIPPED_RECIPES
    python -m prosmin_bench.models.shipped --from <home>
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import WeightsError
from .checkpoints import check_format, interrupted_at
from .converters import NETWORK_CHOICES, pretrain_eval_network

log = logging.getLogger(__name__)

#: The recipes whose checkpoints ship: every pretraining recipe a registered mini model is made by.
SHIPPED_RECIPES = ("dino_micro", "ibot_micro", "mocov3_micro", "prosmin_micro", "prosmin_paperaug_micro")
#: Checkpoint entries only ``pretrain --resume`` reads; evaluation never does.
RESUME_ONLY = ("optimizer", "scaler", "rng")


def shipped_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "_checkpoints"


def shipped_checkpoint(recipe: str) -> Path | None:
    """The shipped checkpoint of ``recipe``, or None when the package ships none."""
    path = shipped_dir() / f"{recipe}.pt"
    return path if recipe in SHIPPED_RECIPES and path.is_file() else None


def evaluated_networks(ckpt: dict[str, Any]) -> set[str]:
    """The networks of ``ckpt`` that the registered models made by its recipe evaluate."""
    from .zoo import catalogue

    specs = [s for _, s in catalogue().items() if s.weights.recipe == ckpt.get("recipe")]
    return {pretrain_eval_network(ckpt, s.weights.network) for s in specs}


def cut(source: Path, dest: Path) -> dict[str, Any]:
    """Write ``source`` (a finished pretraining checkpoint) without :data:`RESUME_ONLY` to ``dest``; returns its
    ``shipped`` entry. Refuses a checkpoint of another format or an interrupted pretraining."""
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    check_format(ckpt, repr(str(source)))
    if interrupted_at(ckpt) is not None:
        raise WeightsError(f"{source} is an interrupted pretraining (step {ckpt.get('step')}); finish it first")
    for key in RESUME_ONLY:
        ckpt.pop(key, None)
    unused = [net for net in NETWORK_CHOICES if net not in evaluated_networks(ckpt)]
    for net in unused:
        ckpt[net] = {}  # pretrain_eval_network reads an empty target as "none"; an empty online is never asked for
    from .weights import sha256_file  # here: weights.py imports this module

    ckpt["shipped"] = {"cut_from_sha256": sha256_file(source), "removed": list(RESUME_ONLY) + unused,
                       "made_by": f"prosmin-bench pretrain --recipe {ckpt.get('recipe')}"}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        torch.save(ckpt, tmp)
    return ckpt["shipped"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cut the shipped micro checkpoints from a home folder's recipes")
    parser.add_argument("--from", dest="home", type=Path, required=True, help="PROSMIN_BENCH_HOME they were made in")
    parser.add_argument("--to", type=Path, default=shipped_dir())
    a = parser.parse_args(argv)
    for recipe in SHIPPED_RECIPES:
        entry = cut(a.home / "checkpoints" / recipe / "checkpoint.pt", a.to / f"{recipe}.pt")
        log.warning("%s: %s (%d bytes)", recipe, entry["made_by"], (a.to / f"{recipe}.pt").stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
