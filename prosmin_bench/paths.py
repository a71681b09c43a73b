"""Where records and their locks go, and whether a folder can be written, checked before any work starts.

Names from cards, records and the command line become path components: :func:`inside` refuses any that would
lead out of their folder (``..``, absolute names, links to elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import config
from .atomic import remove_quietly
from .errors import CacheError, ResultsError
from .registry import NAME_RULE, is_safe_name, model_folder_name


def inside(root: str | os.PathLike, *parts: str, what: str = "file") -> Path:
    """``root / parts...``, refused with a ResultsError when it resolves (links followed) outside ``root``: names
    from cards, records and the command line become path components, and none may write elsewhere."""
    path = Path(root).joinpath(*parts)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise ResultsError(
            f"Refusing to use {what} {str(path)!r}: it leads outside {str(root)!r}; names must be {NAME_RULE}, "
            "and folders inside it must not be links to elsewhere"
        )
    return path


def record_path(results_dir: str | os.PathLike, model: str, task: str) -> Path:
    """Deterministic path ``<results>/<model>/<task>.json``; ``timm:<name>`` is stored as ``timm--<name>``.

    Raises ResultsError when ``model`` or ``task`` cannot be a file name (``registry.NAME_PATTERN``).
    """
    folder = model_folder_name(model)
    if folder is None or not is_safe_name(task):
        bad, kind = (model, "model") if folder is None else (task, "task")
        raise ResultsError(
            f"Expected a {kind} name of {NAME_RULE} (or timm:<name> for a model), but got {bad!r}: it would be "
            f"written outside the results folder; rename it"
        )
    return inside(results_dir, folder, f"{task}.json", what="result file")


def recipe_checkpoint_path(recipe: str) -> Path:
    """Where ``prosmin-bench pretrain --recipe NAME`` writes its final checkpoint,
    ``<home>/checkpoints/<recipe>/checkpoint.pt`` (ResultsError for a recipe name that would lead outside the
    checkpoints folder); a recipe model's weights are looked for there."""
    return inside(config.checkpoints_dir(), recipe, "checkpoint.pt", what="checkpoint")


def safe_lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards the record ``path`` (``<path>.lock``), refused when it is a symbolic link: taking
    the lock opens it for writing with truncation, which through a link would empty the file it points to."""
    lock = Path(f"{path}.lock")
    if lock.is_symlink():
        raise ResultsError(
            f"Lock file {str(lock)!r} is a symbolic link (to {os.readlink(lock)!r}); prosmin-bench never makes "
            "links there: remove it and run again"
        )
    return lock


def _unwritable(folder: Path) -> OSError | None:
    """Why a 4 KiB file cannot be written and synced in ``folder`` (None when it can); the probe is removed."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    finally:
        remove_quietly(probe)
    return None


def _free_bytes(folder: Path, default: int) -> int:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return default
    return st.f_bavail * st.f_frsize


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def folder_write_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder`` (creating it as needed), or None when they can: a file where a
    folder must be, or a refused write in the nearest folder that exists. Creates nothing."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            return f"{str(path)!r} is a file, not a folder"
        probe = path / f".write-test-{os.getpid()}"
        try:
            with open(probe, "wb"):
                pass
        except OSError as exc:
            return f"{str(path)!r} is not writable ({exc.strerror or type(exc).__name__})"
        finally:
            probe.unlink(missing_ok=True)
        return None
    return None


def check_writable(results_dir: str | os.PathLike, need_bytes: int = 1 << 20) -> Path:
    """Fail before any work starts when the results folder cannot be written (read-only, full)."""
    root = Path(results_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"Results folder {str(root)!r} cannot be created ({_reason(exc)}); "
                           "pass a writable --results DIR") from None
    exc = _unwritable(root)
    if exc is not None:
        raise ResultsError(f"Results folder {str(root)!r} is not writable ({_reason(exc)}); "
                           "free space or pass a writable --results DIR")
    free = _free_bytes(root, need_bytes)
    if free < need_bytes:
        raise ResultsError(f"Results folder {str(root)!r} has only {free} bytes free; free space or pass another "
                           "--results DIR")
    return root


def check_cache_writable(need_bytes: int = 1 << 20) -> Path:
    """Fail before any work starts when the cache (``PROSMIN_BENCH_HOME``: features, heads, checkpoints) cannot
    be written; otherwise every (model, task) would fail on its own with a bare OS error."""
    root = config.home()
    todo = f"set {config.HOME_ENV} to a writable folder"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"Cache folder {str(root)!r} ({config.HOME_ENV}) cannot be created ({_reason(exc)}); "
                         f"{todo}") from None
    exc = _unwritable(root)
    if exc is not None:
        raise CacheError(f"Cache folder {str(root)!r} ({config.HOME_ENV}) is not writable ({_reason(exc)}); "
                         f"free space or {todo}")
    free = _free_bytes(root, need_bytes)
    if free < need_bytes:
        raise CacheError(f"Cache folder {str(root)!r} ({config.HOME_ENV}) has only {free} bytes free; free space "
                         f"or {todo}")
    return root
