"""Which record already answers a (model, task) of a run, so that the run reuses it; and the lock guarding it.

A record is reused while it is a result for this model and task, of the card's version, from the same weights,
seeds, evaluated network, run settings and protocol, on data whose fingerprints have not changed
(:func:`_existing_ok`). Records are written under a per-record file lock (:func:`record_lock_path`) kept in the
home folder, so a results folder only ever holds records. :func:`file_stamp` tells a record a run rewrote from one it
left alone (for the console summary and the ``--jobs`` parent's progress lines).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from . import config
from .paths import safe_lock_path
from .results import RUN_CONFIG_DEFAULTS, CorruptRecord, ResultRecord, as_json, read_record
from .tasks import TaskSpec, build_task

if TYPE_CHECKING:
    from .evaluation import FeatureSource
    from .runner import RunOptions

log = logging.getLogger(__name__)


def run_settings(opts: RunOptions) -> dict[str, Any]:
    """The settings of ``opts`` that change a record's numbers (``ResultRecord.run_config``)."""
    return {name: getattr(opts, name) for name in RUN_CONFIG_DEFAULTS}


def _existing_ok(path: Path, spec: TaskSpec, seeds: Sequence[int], sha: str, network: str | None = None, *,
                 model: str, settings: dict[str, Any], source: FeatureSource | None = None,
                 info: dict[str, Any] | None = None) -> ResultRecord | None:
    """The record at ``path`` if it already answers this (model and task, task version, weights, seeds, evaluated
    network, run settings such as the extraction precision, protocol; with ``source``, the data it was computed on
    still has the fingerprints it had).

    A record made before ``ci95`` / ``samples`` / ``ranked`` were recorded is reused: its numbers are not wrong, it
    only lacks the interval (the leaderboard shows none and runs no paired test for it) until a run with
    ``overwrite`` remakes it; ``ranked`` comes from the card then."""
    if not path.is_file():
        return None
    try:
        rec = read_record(path)
    except CorruptRecord as exc:
        log.warning("ignoring unreadable result file %s (%s); it will be recomputed", path, exc)
        return None
    if not isinstance(rec, ResultRecord):
        return None
    if (rec.model, rec.task) != (model, spec.name):  # a copy of another pair's record put in this pair's file
        log.warning("ignoring result file %s: it holds %s / %s, not %s / %s; it will be recomputed", path, rec.model,
                    rec.task, model, spec.name)
        return None
    if rec.task_version != spec.version or rec.weights_sha256 != sha:
        return None
    # Records from before run_config was recorded count as made with the defaults (fp32, float32 features, torch).
    then = {name: rec.settings.get(name) for name in settings}
    if then != settings:
        log.info("%s was computed with %s; recomputing with %s", path, then, settings)
        return None
    # A pretraining checkpoint evaluated through another of its networks (records from before MoCo-v3 checkpoints
    # were evaluated with their base encoder say nothing, which meant the target network; ProSMin's records that
    # say "target" predate its online evaluation, issue 19, and are remade).
    if network is not None and (rec.model_info or {}).get("network", "target") != network:
        return None
    if not set(seeds) <= set(rec.seeds):
        return None
    if any((rec.model_info or {}).get(k) != v for k, v in (info or {}).items()):  # a user module's preprocessing
        return None
    params = build_task(spec).params
    protocol = as_json(dict(vars(params)))
    # A protocol field added later counts, in a record without it, as the value records were made with before.
    if as_json({**getattr(params, "ADDED_FIELDS", {}), **rec.protocol}) != protocol:  # a card edited, no version bump
        log.info("%s was computed with protocol %s; recomputing with %s", path, rec.protocol, protocol)
        return None
    if source is not None:
        changed = source.data_changed(rec.data)
        if changed is not None:
            log.info("%s: %s; recomputing it", path, changed)
            return None
    return rec


def reusable_record(path: Path, spec: TaskSpec, name: str, model: Any, source: FeatureSource,
                    opts: RunOptions) -> ResultRecord | None:
    """The record at ``path`` when ``opts`` allow reuse and it answers this run of ``model`` (:func:`_existing_ok`)."""
    return None if opts.overwrite else _existing_ok(path, spec, opts.seeds, model.weights_sha256, model.network,
                                                    model=name, settings=run_settings(opts), source=source,
                                                    info=getattr(model, "record_info", None))


def record_lock_path(results_dir: str | Path, path: Path) -> Path:
    """The lock file that guards the record ``path``: ``<home>/locks/<sha256 of the results folder>[:16]/<model>/
    <task>.lock``. Not beside the record, so a results folder (the committed ``leaderboards/results`` too) only
    ever holds records; two runs on one results folder share it as long as they share PROSMIN_BENCH_HOME."""
    key = hashlib.sha256(str(Path(results_dir).expanduser().resolve()).encode()).hexdigest()[:16]
    lock = safe_lock_path(config.home() / "locks" / key / path.parent.name / path.stem)
    lock.parent.mkdir(parents=True, exist_ok=True)
    return lock


def _record_lock(results_dir: str | Path, path: Path) -> FileLock:
    return FileLock(str(record_lock_path(results_dir, path)))


def _is_result(path: Path) -> bool:
    try:
        return path.is_file() and isinstance(read_record(path), ResultRecord)
    except CorruptRecord:
        return False


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of a record file, None when there is none. Records are written to a new file that
    is renamed over the old one (``results.write_record``), so a rewritten record has another stamp and a reused
    one keeps its own."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def folder_stamps(results_dir: str | os.PathLike) -> dict[Path, tuple[int, int, int]]:
    """:func:`file_stamp` of every record file under ``results_dir`` (``<model>/<task>.json``), by resolved path."""
    stamps = {}
    for path in Path(results_dir).glob("*/*.json"):
        stamp = file_stamp(path)
        if stamp is not None:
            stamps[path.resolve()] = stamp
    return stamps


def reused_pairs(records: Sequence[Any], results_dir: str | os.PathLike,
                 before: dict[Path, tuple[int, int, int]]) -> set[tuple[str, str]]:
    """The (model, task) of each result record whose file is as it was in ``before`` (:func:`folder_stamps` taken
    before the run): a run that reuses a record leaves its file alone; one that computes it writes a new file."""
    from .paths import record_path

    out = set()
    for rec in records:
        if isinstance(rec, ResultRecord):
            path = record_path(results_dir, rec.model, rec.task).resolve()
            if path in before and file_stamp(path) == before[path]:
                out.add((rec.model, rec.task))
    return out
