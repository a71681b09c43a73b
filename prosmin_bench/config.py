"""Where things live: the cache (features, heads, checkpoints, downloaded weights), data roots, card folders.

Defaults in one place, each with its reason. Environment variables override them; CLI flags override those.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable for the cache root (features, probe heads, pretraining checkpoints, weights, results).
HOME_ENV = "PROSMIN_BENCH_HOME"
#: Environment variable for extra card folders (os.pathsep-separated), same as ``--cards DIR``.
CARDS_ENV = "PROSMIN_BENCH_CARDS"
#: Environment variable for the ImageNet-scale data root, same as ``--data-root``.
DATA_ROOT_ENV = "PROSMIN_BENCH_DATA"


def home() -> Path:
    """The cache root: ``$PROSMIN_BENCH_HOME`` or ``~/.cache/prosmin-bench`` (XDG-style, per user)."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prosmin-bench"


def features_dir() -> Path:
    return home() / "features"


def heads_dir() -> Path:
    """Trained probe heads (linear, logistic), cached so OOD and corruption tasks reuse the linear head."""
    return home() / "heads"


def checkpoints_dir() -> Path:
    """Pretraining outputs, one folder per recipe: ``<home>/checkpoints/<recipe>/checkpoint.pt``."""
    return home() / "checkpoints"


def weights_cache_dir() -> Path:
    """Downloaded official weights (torch.hub downloads land here, not in torch's own cache)."""
    return home() / "weights"


def data_cache_dir() -> Path:
    """Generated mini data (e.g. the corrupted digits), keyed by generator version."""
    return home() / "data"


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ImageNet-scale data root: ``--data-root``, else ``$PROSMIN_BENCH_DATA``, else none."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else None


def default_results_dir() -> Path:
    """A user's records: ``<home>/results``, never the checkout's ``leaderboards/results`` (the committed
    reference records, whose checkpoints come out with other bytes on another machine: writing there by default
    would rewrite tracked files). That folder is written only when named (``--results leaderboards/results``)."""
    return home() / "results"
