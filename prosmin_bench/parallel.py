"""``prosmin-bench run --jobs N``: independent models evaluated in parallel worker processes (issue 20).

One job is one model with all its tasks, in the serial order: a model's tasks share its loaded weights, its cached
features and its linear head (``digits_c`` and ``digits_o`` reuse ``digits_linear``'s), so splitting one model's
tasks across processes would load and extract twice. Each worker runs the ordinary serial runner with
``jobs = 1`` and its share of the cores as intra-op threads (:func:`prosmin_bench.threads.apply`); the workers
write the records under the same per-record locks as a serial run, so the results folder, reuse and resuming are
what they are without ``--jobs``, and the numbers are those of a serial run (a model's computation never spans
two processes).

Before the models start, data the tasks generate on first use and that every model reads (the 75 ``digits_c``
splits: about a minute of one core, once per cache) is made by the same pool, a share of the splits per worker,
instead of by every worker at once.

Workers are spawned, not forked: a forked child inherits the parent's OpenMP and intra-op thread pools in whatever
state they are, which can deadlock once the parent has run a parallel region.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import cards, progress, threads
from .errors import ProsminBenchError

if TYPE_CHECKING:
    from .models import ModelSpec
    from .results import Record
    from .runner import RunOptions
    from .tasks import TaskSpec

log = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _init_worker(level: int, card_dirs: Sequence[str], n_threads: int | None, jobs: int, progress_mode: str) -> None:
    """In each spawned worker: the parent's log level, card folders and progress mode (as a worker: log lines, not
    live bars, which several processes would draw over each other), and this worker's thread count."""
    progress.configure(progress_mode, worker=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
    root = logging.getLogger("prosmin_bench")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for d in card_dirs:
        cards.add_card_dir(d)
    threads.apply(n_threads, jobs=jobs)


def _run_model(model: str, tasks: list[str], opts: RunOptions, prepare: Callable[..., None] | None) -> list[Record]:
    """One job: ``model`` on every task, serially, in this worker."""
    from .runner import evaluate

    return evaluate(model, tasks, options=replace(opts, jobs=1), prepare_weights=prepare)


def _make_data(refs: list[str], data_root: Any) -> int:
    """One warm-up job: load (so generate and cache) each dataset split of ``refs``."""
    from .data import resolve_dataset

    for ref in refs:
        resolve_dataset(ref, data_root)
    return len(refs)


def generated_refs(tspecs: Sequence[TaskSpec]) -> list[str]:
    """The dataset splits the tasks read that are generated on first use and cached (mini-scale corruption sets),
    as ``"name:split"``; files on disk (ImageNet-C) need no warm-up."""
    from .data import DATASETS
    from .tasks import build_task

    refs: list[str] = []
    for spec in tspecs:
        if spec.kind != "corruption":
            continue
        name = getattr(build_task(spec).params, "corrupted", "")
        if name in DATASETS and DATASETS.get(name).scale == "mini":
            refs += [f"{name}:{split}" for split in DATASETS.get(name).splits if f"{name}:{split}" not in refs]
    return refs


def current_records(mspec: ModelSpec, tspecs: Sequence[TaskSpec], opts: RunOptions) -> Iterator[Record | None]:
    """For each task in order, the record of ``mspec`` when it is up to date (the runner's reuse rule: weights,
    task version, seeds, settings, protocol, data fingerprints), else None; checked in this process (the model is
    loaded on the CPU before the first). A model whose weights are not there yet (to be pretrained) or cannot be
    loaded here has work on every task. Lazy: a caller may stop at the first None (used by ``launcher.py`` too)."""
    import torch

    from .models import get_model
    from .paths import recipe_checkpoint_path, record_path
    from .reuse import reusable_record
    from .runner import feature_source

    recipe = mspec.weights.recipe
    if recipe and not opts.shipped and opts.weights is None and not recipe_checkpoint_path(recipe).is_file():
        yield from [None] * len(tspecs)  # --no-shipped with no checkpoint made here: the worker pretrains it
        return
    try:
        model = get_model(mspec, weights=opts.weights, weights_dir=opts.weights_dir, shipped=opts.shipped)
    except (ProsminBenchError, OSError):
        yield from [None] * len(tspecs)  # the worker meets the same problem and records it
        return
    source = feature_source(model, opts, torch.device("cpu"))  # get_model's device; nothing is computed here
    for tspec in tspecs:
        yield reusable_record(record_path(opts.results_dir, mspec.name, tspec.name), tspec, mspec.name, model,
                              source, opts)


def cached_records(mspec: ModelSpec, tspecs: Sequence[TaskSpec], opts: RunOptions) -> list[Record] | None:
    """The records of ``mspec`` on every task when each is up to date (:func:`current_records`), else None;
    checked in this process, so a run with nothing to compute starts no worker."""
    records = []
    for rec in current_records(mspec, tspecs, opts):
        if rec is None:
            return None
        records.append(rec)
    log.info("%s: all %d records up to date", mspec.name, len(records))
    return records


def job_order(mspecs: Sequence[ModelSpec]) -> list[int]:
    """The order models are handed to workers: as given, except that a variant (``prosmin_target_micro``) comes
    right after the model whose checkpoint it reads (never before it: its worker would wait on the other's
    pretraining lock while work is left; never last of all: the other workers would idle while it runs alone), and
    the non-learned references (``pixels``: no network, a quarter of a ViT's time or less) come last, so that the
    short jobs fill the end of the run instead of one long job running alone while the other workers idle."""
    order = sorted((i for i in range(len(mspecs)) if mspecs[i].variant_of is None), key=lambda i: mspecs[i].reference)
    for i in range(len(mspecs)):
        base = mspecs[i].variant_of
        if base is not None:
            at = next((k for k, j in enumerate(order) if mspecs[j].name == base), len(order) - 1)
            order.insert(at + 1, i)
    return order


def evaluate(mspecs: Sequence[ModelSpec], tspecs: Sequence[TaskSpec], opts: RunOptions,
             prepare: Callable[..., None] | None) -> list[Record]:
    """Evaluate ``mspecs`` x ``tspecs`` with ``opts.jobs`` worker processes; the records in the serial order
    (model by model, each model's tasks in order). A worker that dies (killed for memory, a crash in native code)
    leaves an error record for each of its model's tasks that has no result, and the others go on."""
    from .reuse import folder_stamps, reused_pairs
    from .runner import error_records

    results: dict[int, list[Record]] = {}
    order = job_order(mspecs)
    while order and (done := cached_records(mspecs[order[0]], tspecs, opts)) is not None:
        results[order.pop(0)] = done  # a re-run: no worker is started for models whose records are all current
    finished = _Finished(len(mspecs) * len(tspecs), sum(len(r) for r in results.values()))
    if not order:
        return [rec for i in range(len(mspecs)) for rec in results[i]]
    jobs = min(opts.jobs, len(order))
    level = logging.getLogger("prosmin_bench").getEffectiveLevel()
    dirs = [str(d) for d in cards.user_card_dirs()]
    tasks = [t.name for t in tspecs]
    n_threads, source = threads.resolve_threads(opts.threads, jobs)
    log.info("evaluating %d models on %d tasks in %d parallel jobs of %d intra-op thread(s) each (%s)", len(order),
             len(tasks), jobs, n_threads, source)
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker, initargs=(level, dirs, opts.threads, jobs, progress.mode()))
    try:
        refs = generated_refs(tspecs)  # read from the cache when made before (75 small .npy files: instant)
        if refs:
            log.info("preparing %d generated dataset splits (%s) first, shared by the %d jobs", len(refs),
                     refs[0].split(":")[0], jobs)
            shares = [refs[k::jobs] for k in range(jobs)]
            for fut in [pool.submit(_make_data, share, opts.data_root) for share in shares if share]:
                fut.result()  # a failure here recurs in each model's corruption task, which records it
        before = folder_stamps(opts.results_dir)  # only the workers write records, and only after this
        futures = {pool.submit(_run_model, mspecs[i].name, tasks, opts, prepare): i for i in order}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except cf.process.BrokenProcessPool as exc:
                raise ProsminBenchError(
                    f"A worker process of --jobs {jobs} died ({exc}); the records finished so far are kept: run again "
                    "to resume, with fewer --jobs if the machine ran out of memory"
                ) from None
            except ProsminBenchError as exc:  # e.g. a model's weights could not be loaded on this machine
                results[i] = error_records(mspecs[i].name, tspecs, exc, opts)
            finished.report(results[i], reused_pairs(results[i], opts.results_dir, before))
    except BaseException:
        # Ctrl-C reaches the workers too (one process group); SIGTERM may reach only this process: end them, so
        # no worker goes on writing records after the run has stopped.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [rec for i in range(len(mspecs)) for rec in results.get(i, [])]


class _Finished:
    """The parent's progress: a line "pair i/N done: model / task (time)" for each record a worker sends back, in
    the order they come back (the workers number nothing: they see only their model)."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done = total, done

    def report(self, records: Sequence[Record], reused: set[tuple[str, str]]) -> None:
        """``reused``: the (model, task) of the records the job left as they were (:func:`reuse.reused_pairs`)."""
        for rec in records:
            self.done += 1
            if getattr(rec, "record_type", "") == "error":
                how = "failed"
            elif (rec.model, rec.task) in reused:
                how = "up to date"
            else:
                how = f"{getattr(rec, 'wall_time_s', 0.0):.1f} s"
            log.info("pair %d/%d done: %s / %s (%s)", self.done, self.total, rec.model, rec.task, how)


def default_jobs(n_models: int, device: str) -> int:
    """``--jobs`` when not given: one job per usable core for CPU runs of several models (mini scale: each job
    then computes with one intra-op thread, and independent models scale with the cores, which one model's small
    matrices do not), else 1 (a GPU run, a single model, or under torchrun)."""
    from .distributed import launched_by_torchrun

    if n_models < 2 or launched_by_torchrun() or device not in ("auto", "cpu"):
        return 1
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return 1
    return max(1, min(n_models, threads.usable_cores()))


def check_jobs(jobs: int) -> int:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ProsminBenchError(f"Expected `jobs` to be a positive integer, but got {jobs!r}")
    if jobs > 1 and os.environ.get("TORCHELASTIC_RUN_ID"):
        raise ProsminBenchError("--jobs > 1 cannot be combined with torchrun (each rank is already a process); "
                                "drop --jobs or launch without torchrun")
    return jobs
