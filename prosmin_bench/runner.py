"""evaluate(): resolve -> features -> task -> record -> write, for every (model, task), only what is missing.

Each (model, task) is independent: a failure writes an ErrorRecord and the suite goes on. A record is rewritten
only when it is missing, is an error, is for another task version or other weights, lacks a requested seed, or
``overwrite`` is set. Records are written atomically under a per-record file lock, so two runs sharing a results
folder neither corrupt nor duplicate work, and a killed run resumes where it stopped.

The runner evaluates the weights it finds and never trains; a ``prepare_weights`` hook may make them first
(``suite.ensure_weights``, which ``prosmin_bench.evaluate`` and ``prosmin-bench run`` pass, pretrains a missing
mini model). Under torchrun it follows the rank protocol of ``distributed.py`` (rank 0 leads, the others follow).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config, distributed, progress
from .data import DATASETS
from .data.base import DATA_HASHES
from .errors import DataError, ProsminBenchError, UnknownNameError, WeightsError, one_line
from .evaluation import FeatureSource, run_one
from .devices import resolve_device
from .models import ModelSpec, get_model, get_model_spec
from .models.custom import MODULE_PREFIX, resolve_models
from .models.weights import check_weights_file
from .paths import check_cache_writable, check_writable, record_path
from .record_schema import check_seeds
from .results import ErrorRecord, Record, git_commit, utc_now, versions, write_record
from .reuse import _is_result, _record_lock, reusable_record, run_settings
from .settings import CHOICES, EvalSettings, check_choices
from .tasks import TaskSpec, get_task_spec, linear_aug
from .parallel import check_jobs
from .threads import resolve_threads

log = logging.getLogger(__name__)

#: ``prepare_weights(spec, options)``: called on every rank before a model is loaded, e.g. to pretrain a missing
#: mini model (``suite.ensure_weights``, which ``prosmin_bench.evaluate`` passes); the runner never trains.
PrepareWeights = Callable[[ModelSpec, "RunOptions"], None]


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
    # The settings tasks read (EvalSettings) take their defaults, and the reasons for them, from there.
    precision: str = EvalSettings.precision  # extraction autocast: fp32 | bf16 | fp16
    feature_dtype: str = EvalSettings.feature_dtype  # stored feature dtype
    # How image files enter feature cache keys: "stat" (path, size, mtime_ns: no image read, fine for ImageNet's
    # 1.28M files) or "content" (sha256 of every file: also catches an edit that keeps size and mtime).
    data_hash: str = "stat"
    batch_size: int = EvalSettings.batch_size
    num_workers: int = EvalSettings.num_workers
    max_memory: int = EvalSettings.max_memory  # bytes of working memory for k-NN similarity blocks
    knn_backend: str = EvalSettings.knn_backend  # exact k-NN search: torch | faiss
    pretrain_missing: bool = True  # train mini-scale recipe models whose checkpoint is missing (suite.ensure_weights)
    shipped: bool = True  # a recipe model may use the package's checkpoint (models/shipped.py); False: pretrain here
    jobs: int = 1  # models at once in worker processes (parallel.py); the CLI's default: parallel.default_jobs
    threads: int | None = None  # intra-op threads of each job (None: threads.apply's policy)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse settings that would give wrong numbers (a repeated seed counted twice) or fail mid-run."""
        self.seeds = check_seeds(self.seeds)
        resolve_threads(self.threads, check_jobs(self.jobs))  # ThreadConfigError for a count that is not positive
        check_choices(self, {**CHOICES, "data_hash": DATA_HASHES})  # and that faiss is there for --knn-backend faiss


def eval_settings(opts: RunOptions, device: torch.device) -> EvalSettings:
    """What tasks may read of ``opts`` (``TaskContext.settings``), with the device the run resolved."""
    return EvalSettings(device=device, data_root=opts.data_root, batch_size=opts.batch_size,
                        num_workers=opts.num_workers, max_memory=opts.max_memory, precision=opts.precision,
                        feature_dtype=opts.feature_dtype, knn_backend=opts.knn_backend)


def feature_source(model: Any, opts: RunOptions, device: torch.device) -> FeatureSource:
    """The run's feature source for ``model``; on rank 0 under torchrun it announces each extraction to the others."""
    return FeatureSource(model, eval_settings(opts, device), data_hash=opts.data_hash, recompute=opts.overwrite,
                         announce=distributed.lead)


# --- torchrun: every rank extracts, rank 0 alone runs the protocols and writes records ---------------------------
# Rank 0 leads: before each model it loads and each feature set a task asks for, it tells the others what comes next
# (distributed.lead); they follow in _serve_extraction, so every extraction is a collective all ranks enter together.


def _load_model_everywhere(mspec: ModelSpec, opts: RunOptions, dev: torch.device,
                           prepare: PrepareWeights | None, given: Any = None) -> Any:
    """The backbone (after ``prepare(mspec, opts)``, e.g. pretraining a missing mini model; ``given``: a user's
    model already built, moved to ``dev``); under torchrun it fails on every rank if it fails on any, so rank 0 never
    asks for features that another rank cannot compute."""

    def load() -> Any:
        if given is not None:
            return given.to(dev)
        if prepare is not None:
            prepare(mspec, opts)
        return get_model(mspec, weights=opts.weights, device=dev, weights_dir=opts.weights_dir, shipped=opts.shipped)

    def failed_on(rank: int, message: str) -> distributed.DistributedError:
        return distributed.DistributedError(f"Rank {rank} could not load {mspec.name}: {message}")

    return distributed.on_every_rank(load, elsewhere=failed_on, catch=(ProsminBenchError, OSError),
                                     describe=one_line)


def _serve_extraction(mspecs: Sequence[ModelSpec], opts: RunOptions, dev: torch.device,
                      prepare: PrepareWeights | None, given: Sequence[Any]) -> None:
    """Ranks other than 0 under torchrun: load the model rank 0 loads and extract the features it asks for, until
    it says the run is over (rank 0 records every failure; here they are only logged)."""
    source: FeatureSource | None = None

    def handle(message: Any) -> None:
        nonlocal source
        if message[0] == "model":
            try:
                i = message[1]
                source = feature_source(_load_model_everywhere(mspecs[i], opts, dev, prepare, given[i]), opts, dev)
            except (ProsminBenchError, OSError) as exc:
                source = None
                log.debug("rank %d: %s", distributed.rank(), one_line(exc))
        elif message[0] == "features" and source is not None:
            try:
                source.features(*message[1:])  # (ref, layer, preprocess) as FeatureSource.features announced
            except Exception as exc:  # the same failure reaches rank 0 from inside the extraction
                log.debug("rank %d: %s", distributed.rank(), one_line(exc))
        elif message[0] == linear_aug.SERVE_MESSAGE and source is not None:
            # a DDP training pass rank 0 leads (tasks/linear_aug.py). Not caught: a follower that failed here would
            # leave rank 0 waiting in an all-reduce, so it exits and torchrun stops the group; the records written
            # so far are kept and the run resumes from them.
            linear_aug.serve(source, message)

    distributed.follow(handle)


def _check_dataset_refs(spec: TaskSpec) -> None:
    """Every ``"name:split"`` a task card names is a registered dataset with that split (checked before any work,
    so a typo in a card fails fast with close matches instead of after the first tasks have run)."""
    for role, ref in spec.refs.items():
        if not ref.registered:
            continue  # generic sources (imagefolder, hf) are checked when loaded
        name, split = ref.name, ref.split
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


def error_records(model: str, tspecs: Sequence[TaskSpec], exc: BaseException, opts: RunOptions) -> list[Record]:
    """An ErrorRecord of ``exc`` for every task of a model that could not be loaded, written where no finished result
    is (another job on the same folder, or an earlier run with working weights, may have written one)."""
    records: list[Record] = []
    for tspec in tspecs:
        rec = _error_record(model, tspec, exc)
        path = record_path(opts.results_dir, model, tspec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _record_lock(opts.results_dir, path):
            if not _is_result(path):
                write_record(rec, opts.results_dir)
        records.append(rec)
    return records


def evaluate(
    models: str | Iterable[str | ModelSpec], tasks: str | Iterable[str], *, seeds: Sequence[int] = (0,),
    device: str = "auto", results_dir: str | Path | None = None, overwrite: bool = False,
    options: RunOptions | None = None, prepare_weights: PrepareWeights | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None, name: str | None = None,
    data_root: str | Path | None = None,
) -> list[Record]:
    """Evaluate every model on every task; returns the records (new or reused), one per (model, task).

    Args:
        models: model names (``prosmin_micro``, ``dino_vits16``, ``timm:<name>``, ``module:<python.path>:<callable>``),
            ModelSpecs, Backbones, or an ``nn.Module`` mapping images [B, 3, H, W] to features [B, D]
            (``models/custom.py``).
        tasks: task names (``digits_knn``, ``imagenet_c``, ...).
        seeds: seeds of the stochastic parts (probe init and batches, subsets); mean and std over them.
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        results_dir: where ``<model>/<task>.json`` records live (default ``<PROSMIN_BENCH_HOME>/results``; the
            committed reference records in ``leaderboards/results`` are rewritten only when named here).
        overwrite: recompute records that already exist.
        options: every setting of the run (then ``seeds``, ``device`` and ``overwrite`` are not read).
        prepare_weights: called before each model is loaded (see :data:`PrepareWeights`). Without it a recipe
            model's checkpoint must exist; ``prosmin_bench.evaluate`` passes ``suite.ensure_weights``, which
            pretrains a missing mini model.
        transform: PIL image -> tensor for the one nn.Module given (default: the tasks' standard preprocessing at
            the module's expected size); the record states it (``model_info["preprocess"]``).
        name: the name of the records of the one nn.Module given (letters, digits and _ . + -).
        data_root: the folder of the datasets that are files (ImageNet, image folders of task cards).

    Under ``torchrun`` every rank calls this: each extracts its shard of every dataset, rank 0 alone runs the
    protocols and writes the records, and the other ranks return an empty list.
    """
    if options is None:  # the keyword arguments describe the run; with `options`, those are used as given
        options = RunOptions(seeds=seeds, device=device, overwrite=overwrite)
    opts = options
    opts.check()  # options may have been changed since they were made
    if results_dir is not None:
        opts.results_dir = Path(results_dir)
    if data_root is not None:
        opts.data_root = Path(data_root)
    model_list = [models] if isinstance(models, (str, ModelSpec, torch.nn.Module)) else list(models)
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    # Resolve every name before any work, so a typo fails fast with close matches.
    for m in model_list:
        if isinstance(m, str) and not m.startswith(MODULE_PREFIX):
            get_model_spec(m)
    tspecs = [get_task_spec(t) for t in task_list]
    resolved = resolve_models(model_list, name=name, transform=transform, suites=[t.suite for t in tspecs],
                              spec_of=get_model_spec)
    mspecs, given = [s for s, _ in resolved], [b for _, b in resolved]
    for tspec in tspecs:
        _check_dataset_refs(tspec)
    if opts.weights is not None and any(b is not None for b in given):
        raise ProsminBenchError("--weights applies to registered and timm: models; a module's own code loads its "
                                "weights")
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
    if opts.jobs > 1 and len(mspecs) > 1 and all(b is None for b in given) and not distributed.launched_by_torchrun():
        from . import parallel

        return parallel.evaluate(mspecs, tspecs, opts, prepare_weights)  # a user's nn.Module stays in this process
    distributed.init_from_env(opts.device)  # joins the process group under torchrun; a no-op otherwise
    dev = resolve_device(opts.device)  # in the group, this process's own GPU
    if not distributed.is_main():
        _serve_extraction(mspecs, opts, dev, prepare_weights, given)
        return []
    records: list[Record] = []
    n_pairs = len(mspecs) * len(tspecs)
    for model_index, mspec in enumerate(mspecs):
        try:
            distributed.lead(("model", model_index))
            model = _load_model_everywhere(mspec, opts, dev, prepare_weights, given[model_index])
        except (ProsminBenchError, OSError) as exc:
            log.error("%s: %s", mspec.name, one_line(exc))
            records += error_records(mspec.name, tspecs, exc, opts)
            continue
        source = feature_source(model, opts, dev)
        for task_index, tspec in enumerate(tspecs):
            # "pair i/n: " before the pair's log lines (none in a --jobs worker: progress.pair_label)
            label = progress.pair_label(model_index * len(tspecs) + task_index + 1, n_pairs)
            pair, finished = (f"{label}: ", f"{label} done: ") if label else ("", "")
            path = record_path(opts.results_dir, mspec.name, tspec.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            with _record_lock(opts.results_dir, path):
                done = reusable_record(path, tspec, mspec.name, model, source, opts)
                if done is not None:
                    log.info("%s%s / %s: up to date (%s = %.4f)", pair, mspec.name, tspec.name, done.main_score,
                             done.main_value)
                    records.append(done)
                    continue
                log.info("%s%s / %s: running (seeds %s)", pair, mspec.name, tspec.name, list(opts.seeds))
                start = time.perf_counter()
                try:
                    with progress.scope(f"{mspec.name} / {tspec.name}"):
                        rec: Record = run_one(tspec, source, seeds=opts.seeds, run_config=run_settings(opts))
                    # a user module's class and preprocessing, a timm model's preprocessing
                    rec.model_info.update(getattr(model, "record_info", None) or {})
                    log.info("%s%s / %s: %s = %.4f (%.1f s)", finished, mspec.name, tspec.name,
                             rec.main_score, rec.main_value, time.perf_counter() - start)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # one failing (model, task) must not stop the suite
                    rec = _error_record(mspec.name, tspec, exc)
                    log.error("%s%s / %s failed: %s", pair, mspec.name, tspec.name, rec.message)
                    # The failed task's frames hold its data loader: free it (and end its worker processes) now.
                    # Left to the garbage collector, a reference cycle through the exception tears the loader
                    # down in arbitrary order and each worker then waits out torch's 5 s shutdown timeout.
                    traceback.clear_frames(exc.__traceback__)
                write_record(rec, opts.results_dir)
                records.append(rec)
    distributed.lead(None)  # the other ranks' _serve_extraction returns
    return records
