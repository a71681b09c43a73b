"""evaluate(): resolve -> features -> task -> record -> write, for every (model, task), only what is missing.

Each (model, task) is independent: a failure writes an ErrorRecord and the suite goes on. A record is rewritten
only when it is missing, is an error, is for another task version or other weights, lacks a requested seed, or
``overwrite`` is set. Records are written atomically under a per-record file lock, so two runs sharing a results
folder neither corrupt nor duplicate work, and a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config, distributed
from .data import DATASETS, dataset_key, parse_ref, resolve_dataset
from .data.base import DATA_HASHES
from .data.labels import align_labels, describe
from .errors import DataError, ProsminBenchError, UnknownNameError, WeightsError
from .features import PRECISIONS, STORE_DTYPES, extract
from .models import ModelSpec, get_model, get_model_spec, resolve_device
from .models.weights import check_weights_file
from .results import (
    RUN_CONFIG_DEFAULTS, ErrorRecord, Record, ResultRecord, check_cache_writable, check_seeds, check_writable,
    git_commit, read_record, record_path, safe_lock_path, utc_now, versions, write_record, CorruptRecord,
    _json_default,
)
from .tasks import TaskContext, TaskSpec, build_task, get_task_spec
from .tasks.base import catalogue as task_catalogue

log = logging.getLogger(__name__)

SUITES = ("mini", "imagenet")


@dataclass
class RunOptions:
    """Everything a run needs besides the models and tasks. Defaults: the embedded mini suite on this machine."""

    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    results_dir: Path = field(default_factory=config.default_results_dir)
    data_root: Path | None = None
    weights: str | None = None  # one checkpoint path, for a single model
    weights_dir: str | None = None
    overwrite: bool = False
    precision: str = "fp32"  # extraction autocast: fp32 | bf16 | fp16
    feature_dtype: str = "float32"  # stored feature dtype
    # How image files enter feature cache keys: "stat" (path, size, mtime_ns: no image read, fine for ImageNet's
    # 1.28M files) or "content" (sha256 of every file: also catches an edit that keeps size and mtime).
    data_hash: str = "stat"
    batch_size: int = 256
    num_workers: int = 0
    max_memory: int = 1 << 30  # bytes of working memory for k-NN similarity blocks
    pretrain_missing: bool = True  # train mini-scale recipe models whose checkpoint is missing

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse settings that would give wrong numbers (a repeated seed counted twice) or fail mid-run."""
        self.seeds = check_seeds(self.seeds)
        for name, allowed in (("precision", PRECISIONS), ("feature_dtype", STORE_DTYPES), ("data_hash", DATA_HASHES)):
            if getattr(self, name) not in allowed:
                raise ProsminBenchError(f"Expected `{name}` to be one of {list(allowed)}, but got "
                                        f"{getattr(self, name)!r}")


def run_settings(opts: RunOptions) -> dict[str, Any]:
    """The settings of ``opts`` that change a record's numbers (``ResultRecord.run_config``)."""
    return {name: getattr(opts, name) for name in RUN_CONFIG_DEFAULTS}


def suite_models(suite: str) -> list[str]:
    from .models.zoo import catalogue

    return [n for n, s in catalogue().items() if s.scale == suite]


def suite_tasks(suite: str) -> list[str]:
    return [n for n, s in task_catalogue().items() if s.suite == suite]


def _existing_ok(path: Path, spec: TaskSpec, seeds: Sequence[int], sha: str, network: str | None = None, *,
                 model: str, settings: dict[str, Any], source: "_FeatureSource | None" = None) -> ResultRecord | None:
    """The record at ``path`` if it already answers this (model and task, task version, weights, seeds, evaluated
    network, run settings such as the extraction precision, protocol; with ``source``, the data it was computed on
    still has the fingerprints it had)."""
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
    # Records from before run_config was recorded count as made with the defaults (fp32, float32 features).
    then = {name: rec.settings.get(name) for name in settings}
    if then != settings:
        log.info("%s was computed with %s; recomputing with %s", path, then, settings)
        return None
    # A pretraining checkpoint evaluated through another of its networks (records from before MoCo-v3 checkpoints
    # were evaluated with their base encoder say nothing, which meant the target network).
    if network is not None and (rec.model_info or {}).get("network", "target") != network:
        return None
    if not set(seeds) <= set(rec.seeds):
        return None
    protocol = _plain(dict(vars(build_task(spec).params)))
    if _plain(rec.protocol) != protocol:  # a user card edited without a version bump
        log.info("%s was computed with protocol %s; recomputing with %s", path, rec.protocol, protocol)
        return None
    if source is not None:
        changed = source.data_changed(rec.data)
        if changed is not None:
            log.info("%s: %s; recomputing it", path, changed)
            return None
    return rec


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from a record's JSON (tuples as lists, numpy scalars as numbers)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def record_lock_path(results_dir: str | Path, path: Path) -> Path:
    """The lock file that guards the record ``path``: ``<home>/locks/<sha256 of the results folder>[:16]/<model>/
    <task>.lock``. Not beside the record, so a results folder (the committed ``leaderboards/results`` too) only
    ever holds records; two runs on one results folder share it as long as they share PROSMIN_BENCH_HOME."""
    key = hashlib.sha256(str(Path(results_dir).expanduser().resolve()).encode()).hexdigest()[:16]
    lock = safe_lock_path(config.home() / "locks" / key / path.parent.name / path.stem)
    lock.parent.mkdir(parents=True, exist_ok=True)
    return lock


def _record_lock(results_dir: str | Path, path: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(record_lock_path(results_dir, path)))


def _is_result(path: Path) -> bool:
    try:
        return path.is_file() and isinstance(read_record(path), ResultRecord)
    except CorruptRecord:
        return False


class _FeatureSource:
    """Per-model feature access for tasks: datasets resolved once, features from the content-keyed cache."""

    def __init__(self, model: Any, opts: RunOptions, device: torch.device) -> None:
        self.model = model
        self.opts = opts
        self.device = device
        self._datasets: dict[Any, Any] = {}  # dataset key, or (dataset key, training split key) once aligned
        self._features: dict[tuple[str, str, Any], Any] = {}
        self.images_per_second: list[float] = []
        # While a task runs: {dataset key: {"ref", "fingerprint"}} of every dataset it reads (ResultRecord.data).
        self.read: dict[str, dict[str, Any]] | None = None

    def data_identity(self) -> dict[str, Any]:
        """``ResultRecord.data`` for the datasets read since ``self.read`` was reset."""
        return {"hash": self.opts.data_hash, "sets": dict(sorted((self.read or {}).items()))}

    def data_changed(self, data: Any) -> str | None:
        """Why the datasets a record names (its ``data``) are not, now, the data it was computed on; None when each
        still has its recorded fingerprint. Records that name none (made before data identities were recorded) or
        were fingerprinted by another ``--data-hash`` are not vouched for."""
        sets = data.get("sets") if isinstance(data, dict) else None
        if not isinstance(sets, dict) or not sets:
            return "it does not record the data it was computed on"
        if data.get("hash") != self.opts.data_hash:
            return f"its data was fingerprinted with --data-hash {data.get('hash')}, not {self.opts.data_hash}"
        for key, entry in sets.items():
            try:
                ref, fingerprint = entry["ref"], entry["fingerprint"]
                now = self.dataset(ref)
                same = dataset_key(ref) == key and now.fingerprint_for(self.opts.data_hash) == fingerprint
            except (ProsminBenchError, OSError) as exc:
                return f"its dataset {key} cannot be read now ({one_line(exc)})"
            except (KeyError, TypeError, ValueError, AttributeError):
                return f"its data identity for {key} is malformed"
            if not same:
                return f"dataset {key} has changed since it was computed"
        return None

    def dataset(self, ref: Any, labels_from: Any = None) -> Any:
        """The dataset ``ref``; with ``labels_from`` (a task's training split), labelled by class name in that
        split's class list (DataError naming a class it has images of and the training split has none)."""
        train = None if labels_from is None else self.dataset(labels_from)  # first: its faults are reported first
        key = dataset_key(ref)
        if key not in self._datasets:
            self._datasets[key] = resolve_dataset(ref, self.opts.data_root)
        if self.read is not None and key not in self.read:
            self.read[key] = {"ref": ref, "fingerprint": self._datasets[key].fingerprint_for(self.opts.data_hash)}
        if train is None:
            return self._datasets[key]
        aligned = (key, dataset_key(labels_from))
        if aligned not in self._datasets:
            self._datasets[aligned] = align_labels(self._datasets[key], train, name=describe(ref, self._datasets[key]),
                                                   train_name=describe(labels_from, train))
        return self._datasets[aligned]

    def features(self, ref: Any, layer: str, model: Any = None, labels_from: Any = None, **kwargs: Any) -> Any:
        """Features of ``ref`` in ``layer``, extracted (or read from the cache) once per run; with ``overwrite`` the
        cache entries are recomputed, once. ``model``: another view of this backbone (e.g. other preprocessing),
        extracted by this process alone. ``labels_from``: as in :meth:`dataset`."""
        if labels_from is not None:
            aligned = self.dataset(ref, labels_from)  # checked before the extraction, which it does not change
            fs = self.features(ref, layer, model, **kwargs)
            if aligned is self.dataset(ref):
                return fs
            # Extraction keeps the dataset's sample order, so the aligned labels pair up with the rows.
            return dataclasses.replace(fs, labels=aligned.labels)
        view = self.model if model is None else model
        key = (dataset_key(ref), layer, None if model is None else view.spec.preprocess.key())
        if key not in self._features:
            if model is None:
                _tell_workers(("features", ref, layer))  # under torchrun every rank extracts its shard
            fs = extract(
                view, self.dataset(ref), dataset_id=key[0], layer=layer, batch_size=self.opts.batch_size,
                device=self.device, precision=self.opts.precision, dtype=self.opts.feature_dtype,
                num_workers=self.opts.num_workers, shard=model is None, data_hash=self.opts.data_hash,
                recompute=self.opts.overwrite,
            )
            if fs.computed:
                self.images_per_second.append(float(fs.meta.get("images_per_second", 0.0)))
            self._features[key] = fs
        return self._features[key]


# --- torchrun: every rank extracts, rank 0 alone runs the protocols and writes records ---------------------------
# Rank 0 drives: before each model it loads and each feature set a task asks for, it broadcasts what comes next;
# the other ranks follow in _serve_extraction, so every extraction is a collective that all ranks enter together.


def _tell_workers(message: Any) -> None:
    """On rank 0 under torchrun, announce the next step to the other ranks (a no-op otherwise)."""
    if distributed.world_size() > 1 and distributed.is_main():
        distributed.broadcast_object(message)


def _load_model_everywhere(mspec: ModelSpec, opts: RunOptions, dev: torch.device) -> Any:
    """The backbone (pretraining a missing mini model first); under torchrun it fails on every rank if it fails on
    any, so rank 0 never asks for features that another rank cannot compute."""
    model, error = None, None
    try:
        _ensure_weights(mspec, opts)
        model = get_model(mspec, weights=opts.weights, device=dev, weights_dir=opts.weights_dir)
    except (ProsminBenchError, OSError) as exc:
        error = exc
    if distributed.world_size() > 1:
        reports = distributed.all_gather_object(None if error is None else one_line(error))
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if error is None and failed:
            error = distributed.DistributedError(f"Rank {failed[0][0]} could not load {mspec.name}: {failed[0][1]}")
    if error is not None:
        raise error
    return model


def _serve_extraction(mspecs: Sequence[ModelSpec], opts: RunOptions, dev: torch.device) -> None:
    """Ranks other than 0 under torchrun: load the model rank 0 loads and extract the features it asks for, until
    it says the run is over (rank 0 records every failure; here they are only logged)."""
    source: _FeatureSource | None = None
    while True:
        message = distributed.broadcast_object(None)
        if message is None:
            return
        if message[0] == "model":
            try:
                source = _FeatureSource(_load_model_everywhere(mspecs[message[1]], opts, dev), opts, dev)
            except (ProsminBenchError, OSError) as exc:
                source = None
                log.debug("rank %d: %s", distributed.rank(), one_line(exc))
        elif message[0] == "features" and source is not None:
            try:
                source.features(message[1], message[2])
            except Exception as exc:  # the same failure reaches rank 0 from inside the extraction
                log.debug("rank %d: %s", distributed.rank(), one_line(exc))


def _ensure_weights(spec: ModelSpec, opts: RunOptions) -> None:
    """Pretrain a mini-scale recipe model whose checkpoint is missing, or finish one whose pretraining was
    interrupted (the default suite makes its own models; a part-way checkpoint is never evaluated as the model).

    One process at a time per recipe: a second run that needs the same model waits for the first's pretraining,
    then uses its checkpoint (two runs pretraining into one folder would overwrite each other's checkpoints).
    """
    if not (opts.pretrain_missing and spec.weights.recipe and spec.scale == "mini" and opts.weights is None):
        return
    from .models.weights import recipe_checkpoint_path

    if opts.weights_dir and any(p.is_file() for p in (Path(opts.weights_dir) / spec.name / "checkpoint.pt",
                                                       Path(opts.weights_dir) / f"{spec.name}.pt")):
        return  # get_model loads the given file (and refuses it if it is interrupted)
    recipe = spec.weights.recipe
    path = recipe_checkpoint_path(recipe)
    # Under torchrun every rank pretrains together: rank 0 alone holds the lock and tells the others what to do.
    with _recipe_lock(recipe) if distributed.is_main() else contextlib.nullcontext():
        state: Any = None
        if distributed.is_main():
            try:
                state = _recipe_checkpoint_state(spec, path)
            except (ProsminBenchError, OSError) as exc:
                state = exc  # every rank raises it, none waits for a pretraining that will not start
        if distributed.world_size() > 1:
            state = distributed.broadcast_object(state)
        if isinstance(state, BaseException):
            raise state
        if state == "done":
            _warn_if_recipe_changed(recipe, path)
            return
        from .pretrain import pretrain

        if state == "missing":
            log.info("pretraining %s (recipe %s): no checkpoint yet", spec.name, recipe)
        else:
            log.info("%s (recipe %s): its pretraining was interrupted at step %d of %d; resuming it", spec.name,
                     recipe, *state)
        pretrain(recipe, device=opts.device, resume=True)


@contextlib.contextmanager
def _recipe_lock(recipe: str) -> Iterator[None]:
    """One process at a time pretrains ``recipe`` into its checkpoint folder (a file lock in that folder)."""
    from filelock import FileLock, Timeout

    from .models.weights import recipe_checkpoint_path

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


def _recipe_checkpoint_state(spec: ModelSpec, path: Path) -> str | tuple[int, int]:
    """``"missing"``, ``"done"``, or ``(step, end)`` of an interrupted pretraining that will be resumed.

    A checkpoint that cannot be read (truncated) or cannot be resumed (made with other settings) is an error that
    says how to make it again; it is never deleted here.
    """
    if not path.is_file():
        return "missing"
    from .models.weights import interrupted_at, interrupted_message, load_checkpoint_file, remake_advice
    from .pretrain import resolve_config
    from .pretrain.checkpoint import check_format
    from .pretrain.train import config_differences

    recipe = spec.weights.recipe
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
            f"{interrupted_message(ckpt, path)}, or move {str(path.parent)!r} away to let `run` pretrain recipe "
            f"{recipe} anew (the checkpoint differs from it in {', '.join(diffs[:4])})"
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
    from .pretrain import resolve_config

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


#: The first line torch's DataLoader gives an error re-raised from a worker process (``ExceptionWrapper``).
_WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def one_line(exc: BaseException) -> str:
    """The one-line message of an error, for logs, error records and the CLI.

    An error raised in a DataLoader worker (an unreadable image with ``--num-workers`` > 0) is re-raised by torch
    as ``Caught DataError in DataLoader worker process 0.`` followed by the worker's traceback; the original
    message is the traceback's last ``<type>: <message>`` line, recovered here.
    """
    lines = str(exc).splitlines()
    if not lines:
        return type(exc).__name__
    if _WORKER_ERROR.match(lines[0]):
        cls = type(exc)
        heads = (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: ")
        for line in reversed(lines):
            for head in heads:
                if line.startswith(head):
                    return line[len(head):]
    return lines[0]


def _check_dataset_refs(spec: TaskSpec) -> None:
    """Every ``"name:split"`` a task card names is a registered dataset with that split (checked before any work,
    so a typo in a card fails fast with close matches instead of after the first tasks have run)."""
    for role, ref in spec.datasets.items():
        if not isinstance(ref, str):
            continue  # generic sources (imagefolder, hf) are checked when loaded
        name, split = parse_ref(ref)
        where = f"Task {spec.name!r} ({spec.card or 'built-in'}), datasets.{role}"
        if name not in DATASETS:
            raise UnknownNameError(f"{where}: {DATASETS.unknown_message(name)}")
        splits = DATASETS.get(name).splits
        if split not in splits:
            raise DataError(f"{where}: dataset {name!r} has no split {split!r}; expected one of {list(splits)}")


def _error_record(model: str, spec: TaskSpec, exc: BaseException) -> ErrorRecord:
    user = isinstance(exc, ProsminBenchError)
    return ErrorRecord(
        model=model, task=spec.name, task_version=spec.version, error_type=type(exc).__name__,
        message=one_line(exc),
        traceback="" if user else "".join(traceback.format_exception(exc))[-4000:],
        versions=versions(), git_commit=git_commit(), timestamp_utc=utc_now(),
    )


def _labels_from(spec: TaskSpec) -> Callable[[Any], Any]:
    """``ref ->`` the split whose class list labels ``ref`` in task ``spec``: the training split for every split but
    the training split itself and the OOD set (whose images belong to no class); None in tasks without one."""
    train, ood = spec.datasets.get("train"), spec.datasets.get("ood")

    def of(ref: Any) -> Any:
        return None if train is None or ref == train or (ood is not None and ref == ood) else train

    return of


def _run_one(model: Any, spec: TaskSpec, opts: RunOptions, device: torch.device, source: _FeatureSource) -> ResultRecord:
    task = build_task(spec)
    per_seed: dict[str, dict[str, float]] = {}
    extras: dict[str, Any] = {}
    labels_from = _labels_from(spec)
    unchecked = [ref for ref in spec.datasets.values() if labels_from(ref) is not None]

    def checked_labels_from(ref: Any) -> Any:
        # At the task's first request for data (after its own card checks, before any image is read) every labelled
        # split is checked against the training split's classes, so a missing class costs no extraction.
        while unchecked:
            source.dataset(unchecked[0], labels_from(unchecked[0]))
            unchecked.pop(0)
        return labels_from(ref)

    start = time.perf_counter()
    source.read = {}
    for seed in opts.seeds:
        torch.manual_seed(seed)
        ctx = TaskContext(
            model=model, seed=seed, device=device, data_root=opts.data_root, options=opts,
            feature_fn=lambda ref, layer, **kw: source.features(ref, layer, labels_from=checked_labels_from(ref), **kw),
            dataset_fn=lambda ref: source.dataset(ref, checked_labels_from(ref)),
        )
        out = task.run(ctx)
        per_seed[str(seed)] = {k: float(v) for k, v in out.metrics.items()}
        if not extras:
            extras = out.extras
    wall = time.perf_counter() - start
    data, source.read = source.data_identity(), None
    ips = source.images_per_second
    mspec = model.spec
    return ResultRecord(
        model=mspec.name, task=spec.name, task_version=spec.version, task_kind=spec.kind, suite=spec.suite,
        main_score=spec.main_score, weights_sha256=model.weights_sha256, seeds=list(opts.seeds), per_seed=per_seed,
        protocol=dict(vars(task.params)) if hasattr(task.params, "__dict__") else {}, run_config=run_settings(opts),
        datasets=spec.datasets, data=data, extras=extras,
        model_info={"method": mspec.method, "arch": mspec.arch, "weights": mspec.weights.kind,
                    "recipe": mspec.weights.recipe, "pretrained_on": list(mspec.pretrained_on),
                    "weights_path": model.weights_path, **({"network": model.network} if model.network else {})},
        versions=versions(), git_commit=git_commit(), device=str(device), wall_time_s=wall,
        images_per_second=(sum(ips) / len(ips)) if ips else None, timestamp_utc=utc_now(),
    )


def evaluate(
    models: str | Iterable[str | ModelSpec], tasks: str | Iterable[str], *, seeds: Sequence[int] = (0,),
    device: str = "auto", results_dir: str | Path | None = None, overwrite: bool = False,
    options: RunOptions | None = None,
) -> list[Record]:
    """Evaluate every model on every task; returns the records (new or reused), one per (model, task).

    Args:
        models: model names (``prosmin_micro``, ``dino_vits16``, ``timm:<name>``) or ModelSpecs.
        tasks: task names (``digits_knn``, ``imagenet_c``, ...).
        seeds: seeds of the stochastic parts (probe init and batches, subsets); mean and std over them.
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        results_dir: where ``<model>/<task>.json`` records live (default ``<PROSMIN_BENCH_HOME>/results``; the
            committed reference records in ``leaderboards/results`` are rewritten only when named here).
        overwrite: recompute records that already exist.

    Under ``torchrun`` every rank calls this: each extracts its shard of every dataset, rank 0 alone runs the
    protocols and writes the records, and the other ranks return an empty list.
    """
    if options is None:  # the keyword arguments describe the run; with `options`, those are used as given
        options = RunOptions(seeds=seeds, device=device, overwrite=overwrite)
    opts = options
    opts.check()  # options may have been changed since they were made
    if results_dir is not None:
        opts.results_dir = Path(results_dir)
    model_list = [models] if isinstance(models, (str, ModelSpec)) else list(models)
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    # Resolve every name before any work, so a typo fails fast with close matches.
    mspecs = [m if isinstance(m, ModelSpec) else get_model_spec(m) for m in model_list]
    tspecs = [get_task_spec(t) for t in task_list]
    for tspec in tspecs:
        _check_dataset_refs(tspec)
    if opts.weights is not None and len(mspecs) != 1:
        raise ProsminBenchError(f"--weights applies to one model, but {len(mspecs)} were given; use --weights-dir")
    # Inputs named on the command line are checked before any work, so a typo costs nothing.
    if opts.weights is not None:
        check_weights_file(opts.weights)
    if opts.weights_dir is not None and not Path(opts.weights_dir).expanduser().is_dir():
        raise WeightsError(f"--weights-dir {str(opts.weights_dir)!r} is not a folder; check the path")
    if opts.data_root is not None and not Path(opts.data_root).expanduser().is_dir():
        raise DataError(f"Data root {str(opts.data_root)!r} does not exist; pass the folder that holds imagenet/, "
                        "imagenet-o/, imagenet-c/ (see `prosmin-bench data check --data-root DIR`)")
    for mspec in mspecs:  # a name that cannot be a file name inside the results folder fails before any work
        for tspec in tspecs:
            record_path(opts.results_dir, mspec.name, tspec.name)
    resolve_device(opts.device)  # so does a device this machine does not have
    check_writable(opts.results_dir)
    check_cache_writable()  # features, heads, checkpoints and locks live there
    distributed.init_from_env(opts.device)  # joins the process group under torchrun; a no-op otherwise
    dev = distributed.process_device(opts.device) if distributed.world_size() > 1 else resolve_device(opts.device)
    if not distributed.is_main():
        _serve_extraction(mspecs, opts, dev)
        return []
    records: list[Record] = []
    for model_index, mspec in enumerate(mspecs):
        try:
            _tell_workers(("model", model_index))
            model = _load_model_everywhere(mspec, opts, dev)
        except (ProsminBenchError, OSError) as exc:
            log.error("%s: %s", mspec.name, one_line(exc))
            for tspec in tspecs:
                rec = _error_record(mspec.name, tspec, exc)
                path = record_path(opts.results_dir, mspec.name, tspec.name)
                path.parent.mkdir(parents=True, exist_ok=True)
                with _record_lock(opts.results_dir, path):
                    # Never replace a finished result with this failure: another run (another job on the same
                    # folder, or an earlier run with working weights) may have written it.
                    if not _is_result(path):
                        write_record(rec, opts.results_dir)
                records.append(rec)
            continue
        source = _FeatureSource(model, opts, dev)
        for tspec in tspecs:
            path = record_path(opts.results_dir, mspec.name, tspec.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            with _record_lock(opts.results_dir, path):
                done = None if opts.overwrite else _existing_ok(path, tspec, opts.seeds, model.weights_sha256,
                                                                model.network, model=mspec.name,
                                                                settings=run_settings(opts), source=source)
                if done is not None:
                    log.info("%s / %s: up to date (%s = %.4f)", mspec.name, tspec.name, done.main_score, done.main_value)
                    records.append(done)
                    continue
                log.info("%s / %s: running (seeds %s)", mspec.name, tspec.name, list(opts.seeds))
                try:
                    rec: Record = _run_one(model, tspec, opts, dev, source)
                    log.info("%s / %s: %s = %.4f", mspec.name, tspec.name, rec.main_score, rec.main_value)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # one failing (model, task) must not stop the suite
                    rec = _error_record(mspec.name, tspec, exc)
                    log.error("%s / %s failed: %s", mspec.name, tspec.name, rec.message)
                    # The failed task's frames hold its data loader: free it (and end its worker processes) now.
                    # Left to the garbage collector, a reference cycle through the exception tears the loader
                    # down in arbitrary order and each worker then waits out torch's 5 s shutdown timeout.
                    traceback.clear_frames(exc.__traceback__)
                write_record(rec, opts.results_dir)
                records.append(rec)
    _tell_workers(None)  # the other ranks' _serve_extraction returns
    return records
