"""``prosmin-bench run --launcher local|slurm``: the (model, task) grid as a submitit job array (issue 21).

One job is one (model, task) pair, evaluated by the same entry point as the in-process run
(:func:`prosmin_bench.suite.evaluate` with the run's :class:`~prosmin_bench.runner.RunOptions`), so the records are
the in-process run's. All jobs write into one results folder: records are written atomically under per-record
locks (``reuse.record_lock_path``), so concurrent jobs neither corrupt nor duplicate a record, and the folder is
what a serial run would leave. Before submitting, this process does what the jobs would otherwise all do at once:

1. pretrains the mini models whose checkpoint is missing (``suite.ensure_weights``; with the checkpoints shipped in
   the package this is a no-op),
2. leaves out every pair whose record is current (``parallel.current_records``, the ``--jobs`` pre-check), and
3. generates the datasets the pending tasks create on first use (``parallel.generated_refs``: digits_c's splits).

A job with ``--gpus-per-job G`` > 1 runs G processes on one node (``tasks_per_node = gpus_per_node = G``); each
exports the torchrun variables ``distributed.init_from_env`` reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) with ``submitit.helpers.TorchDistributedEnvironment`` and extraction is sharded as under torchrun.

Requeue: the job callable is a ``submitit.helpers.Checkpointable`` whose ``checkpoint`` resubmits the same call.
When SLURM signals the time limit or a preemption, submitit requeues it; the new run skips the records that are
current and redoes the pair that was cut off (features already cached are read back, not extracted again).
The convention follows DINO's ``run_with_submitit.py`` (facebookresearch/dino: ``Trainer.checkpoint`` requeues the
same trainer; ``executor.update_parameters`` with ``tasks_per_node = gpus_per_node``, ``slurm_signal_delay_s=120``).

submitit is optional (``pip install 'prosmin-bench[cluster]'``): where it is installed it is imported with this
module (about 0.1 s, on every ``run``: ``GridJob`` subclasses its ``Checkpointable``), and it is required only when a
launcher is used.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cards, threads
from .errors import ProsminBenchError, one_line

try:  # only this module imports submitit; without it a launcher is refused (require_submitit) before any job
    from submitit.helpers import Checkpointable
except ImportError:  # not installed: no GridJob is ever made then (require_submitit refuses the launch first)
    Checkpointable = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from .results import Record
    from .runner import RunOptions
    from .suite import Selection

log = logging.getLogger(__name__)

LAUNCHERS = ("none", "local", "slurm")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Flags that only mean something with a launcher (``--launcher none`` refuses them: the user forgot --launcher).
_FLAGS = {"slurm_partition": "--slurm-partition", "gpus_per_job": "--gpus-per-job", "slurm_time": "--slurm-time",
          "slurm_cpus_per_task": "--slurm-cpus-per-task", "slurm_mem": "--slurm-mem",
          "slurm_account": "--slurm-account", "slurm_log_dir": "--slurm-log-dir", "wait": "--wait"}
_SLURM_ONLY = ("slurm_partition", "slurm_cpus_per_task", "slurm_mem", "slurm_account")


@dataclass
class LaunchOptions:
    """How the grid is launched; ``argparse`` only fills it. Defaults follow DINO's ``run_with_submitit.py``
    (facebookresearch/dino) where it has one."""

    launcher: str = "local"  # "local": submitit.LocalExecutor on this machine (CI); "slurm": sbatch job array
    partition: str | None = None  # SLURM partition (required for slurm)
    gpus_per_job: int = 1  # GPUs and processes of each job, on one node (0: a CPU job of one process)
    time_min: int = 1440  # wall-clock limit of each job; a pair cut off by it is requeued and redone
    cpus_per_task: int = 10  # CPU cores per process (DINO's run_with_submitit.py: 10 per GPU)
    mem: int | None = None  # bytes of memory per job (None: the partition's default)
    account: str | None = None  # SLURM account to charge
    log_dir: Path | None = None  # submitit's pickles and logs (None: <results>/.submitit)
    wait: bool = False  # slurm: wait for the jobs and print the run's table (local always waits)
    signal_delay_s: int = 120  # SLURM signals the job this long before its time limit (DINO: 120)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS[1:]:
            raise ProsminBenchError(f"Expected `launcher` to be one of {list(LAUNCHERS[1:])}, but got "
                                    f"{self.launcher!r}")
        for name in ("gpus_per_job", "time_min", "cpus_per_task"):
            value, low = getattr(self, name), 0 if name == "gpus_per_job" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ProsminBenchError(f"Expected `{name}` to be an integer >= {low}, but got {value!r}")
        if self.launcher == "slurm" and not self.partition:
            raise ProsminBenchError("--launcher slurm needs --slurm-partition NAME (see `sinfo -s` for the "
                                    "partitions of this cluster)")

    @property
    def processes(self) -> int:
        """Processes per job: one per GPU, at least one."""
        return max(1, self.gpus_per_job)


def from_args(a: argparse.Namespace) -> LaunchOptions | None:
    """The launch of ``prosmin-bench run`` (None: ``--launcher none``, the in-process run); refuses launcher flags
    without a launcher, ``--jobs`` with one, and a launch from inside torchrun."""
    values = {flag: getattr(a, name, None) for name, flag in _FLAGS.items()}
    given = [flag for flag, v in values.items() if v is not None and v is not False]  # --gpus-per-job 0 is given
    if a.launcher == "none":
        if given:
            raise ProsminBenchError(f"{given[0]} applies to --launcher local|slurm; add --launcher slurm (or drop "
                                    f"{given[0]})")
        return None
    if a.jobs is not None:
        raise ProsminBenchError(f"--jobs runs models in processes of this machine; --launcher {a.launcher} runs "
                                "one job per (model, task): drop one of them")
    from .distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ProsminBenchError("--launcher submits jobs that start their own processes; run it without torchrun "
                                "(--gpus-per-job G gives each job G processes)")
    ignored = [_FLAGS[name] for name in _SLURM_ONLY if getattr(a, name, None) is not None]
    if a.launcher == "local" and ignored:
        log.warning("--launcher local ignores %s (they are sbatch settings)", ", ".join(ignored))
    launch = LaunchOptions(
        launcher=a.launcher, partition=a.slurm_partition, account=a.slurm_account, mem=a.slurm_mem,
        gpus_per_job=1 if a.gpus_per_job is None else a.gpus_per_job,
        time_min=LaunchOptions.time_min if a.slurm_time is None else a.slurm_time,
        cpus_per_task=LaunchOptions.cpus_per_task if a.slurm_cpus_per_task is None else a.slurm_cpus_per_task,
        log_dir=a.slurm_log_dir, wait=a.wait)
    if launch.launcher == "slurm" and not launch.wait and a.leaderboard is not None:
        raise ProsminBenchError("--leaderboard with --launcher slurm needs --wait (or run `prosmin-bench leaderboard "
                                "--out ...` once the jobs have ended)")
    return launch


def require_submitit() -> Any:
    """The submitit module, or the one-line error that says how to install it."""
    try:
        return importlib.import_module("submitit")
    except ImportError:
        raise ProsminBenchError("--launcher local|slurm needs submitit: pip install 'prosmin-bench[cluster]'") \
            from None


class GridJob(Checkpointable):
    """The callable every job of the array runs: ``job(model, task)`` evaluates one pair with the run's options
    and returns its records (rank 0; the other ranks of a multi-GPU job return ``[]``)."""

    def __init__(self, options: RunOptions, *, processes: int = 1, share: int = 1, log_level: int = logging.INFO,
                 card_dirs: tuple[str, ...] = ()) -> None:
        self.options = options
        self.processes = processes  # processes of this job (one per GPU)
        self.share = share  # processes of the launch that share this machine's cores (local: all running ones)
        self.log_level = log_level
        self.card_dirs = card_dirs

    def __call__(self, model: str, task: str) -> list[Record]:
        threads.prepare_environment()  # before torch loads OpenMP (inherited from the submitting process too)
        handler = logging.StreamHandler()  # the job's stderr: <log dir>/<job id>_<rank>_log.err
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
        root = logging.getLogger("prosmin_bench")
        root.handlers[:] = [handler]
        root.setLevel(self.log_level)
        root.propagate = False
        for d in self.card_dirs:
            cards.add_card_dir(d)
        threads.apply(self.options.threads, jobs=self.share)
        if self.processes > 1:  # what distributed.init_from_env reads, as torchrun would set it
            require_submitit().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                            overwrite=True)
        from . import distributed, suite

        log.info("job: %s / %s (%d process(es))", model, task, self.processes)
        try:
            return suite.evaluate([model], [task], options=replace(self.options, jobs=1))
        finally:
            distributed.destroy()

    def checkpoint(self, model: str, task: str) -> Any:
        """Called by submitit on the time-limit or preemption signal: requeue the same call. Records finished
        before the signal are current, so the requeued job skips them and redoes only the pair that was cut off."""
        log.warning("%s / %s: requeued (time limit or preemption); finished records are kept", model, task)
        return require_submitit().helpers.DelayedSubmission(self, model, task)


@dataclass(frozen=True)
class Submitted:
    """Jobs handed to SLURM without ``--wait``: what ``run`` prints."""

    jobs: list[tuple[str, str, str]]  # (job id, model, task)
    log_dir: Path
    current: int  # pairs left out because their record is current
    results_dir: Path

    def describe(self) -> str:
        array = self.jobs[0][0].split("_")[0]
        lines = [f"submitted {len(self.jobs)} (model, task) job(s) as SLURM array {array}; logs in {self.log_dir}"]
        lines += [f"  {job_id}  {model} / {task}" for job_id, model, task in self.jobs]
        if self.current:
            lines.append(f"{self.current} pair(s) with current records were not submitted")
        lines.append(f"follow them with `squeue -j {array}`; once they have ended, `prosmin-bench leaderboard "
                     f"--results {self.results_dir}` shows the results (re-running this command redoes only "
                     "missing or failed pairs)")
        return "\n".join(lines) + "\n"


def _absolute(opts: RunOptions) -> RunOptions:
    """``opts`` with the paths a job reads made absolute (a job may start in another folder)."""

    def local(p: Any) -> Any:
        return str(Path(p).expanduser().absolute()) if p is not None and Path(p).expanduser().exists() else p

    return replace(opts, results_dir=Path(opts.results_dir).expanduser().absolute(),
                   data_root=None if opts.data_root is None else Path(opts.data_root).expanduser().absolute(),
                   weights=local(opts.weights), weights_dir=local(opts.weights_dir))


def _check_inputs(models: list[str], tasks: list[str], opts: RunOptions, launch: LaunchOptions) -> list[Any]:
    """What the runner checks before any work, here before any job (a typo fails now, not in every job); returns
    (ModelSpec, built module or None) per model. The device is checked only for local jobs (a login node may
    have no GPU)."""
    from .devices import resolve_device
    from .errors import DataError, WeightsError
    from .models import get_model_spec, resolve_models
    from .models.weights import check_weights_file
    from .paths import check_cache_writable, check_writable, record_path
    from .tasks import get_task_spec

    tspecs = [get_task_spec(t) for t in tasks]
    resolved = resolve_models(models, name=None, transform=None, suites=[t.suite for t in tspecs],
                              spec_of=get_model_spec)
    if opts.weights is not None:
        if len(resolved) != 1:
            raise ProsminBenchError(f"--weights applies to one model, but {len(resolved)} were given; use "
                                    "--weights-dir")
        check_weights_file(opts.weights)
    if opts.weights_dir is not None and not Path(opts.weights_dir).is_dir():
        raise WeightsError(f"--weights-dir {str(opts.weights_dir)!r} is not a folder; check the path")
    if opts.data_root is not None and not Path(opts.data_root).is_dir():
        raise DataError(f"Data root {str(opts.data_root)!r} does not exist; pass the folder that holds imagenet/ "
                        "(see `prosmin-bench data check --data-root DIR`)")
    for spec, _ in resolved:
        for t in tasks:
            record_path(opts.results_dir, spec.name, t)
    if launch.launcher == "local":
        resolve_device(opts.device)
    elif shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ProsminBenchError("--launcher slurm needs SLURM's sbatch and srun, which are not on PATH here; submit "
                                "from a login node of the cluster (or try the grid with --launcher local)")
    check_writable(opts.results_dir)
    check_cache_writable()
    return resolved


def pending_pairs(tasks: list[str], opts: RunOptions, resolved: list[Any]
                  ) -> tuple[list[tuple[int, int]], dict[tuple[int, int], Record]]:
    """``(pairs to submit, current records)`` as (model index, task index): the mini models whose checkpoint is
    missing are pretrained first (``suite.ensure_weights``, here and not in every job at once); a pair whose
    record is current is not submitted. A user's module (``module:``) is always submitted (its job reuses a
    current record in a moment)."""
    from .suite import ensure_weights
    from .parallel import current_records
    from .tasks import get_task_spec

    tspecs = [get_task_spec(t) for t in tasks]
    pending, current = [], {}
    for i, (mspec, built) in enumerate(resolved):
        if built is None:
            try:
                ensure_weights(mspec, opts)
            except (ProsminBenchError, OSError) as exc:  # the job meets it again and records it
                log.error("%s: %s", mspec.name, one_line(exc))
            found = list(current_records(mspec, tspecs, opts))
        else:
            found = [None] * len(tspecs)
        for k, rec in enumerate(found):
            if rec is None:
                pending.append((i, k))
            else:
                current[(i, k)] = rec
    log.info("%d of %d (model, task) pairs have current records; %d to run", len(current),
             len(resolved) * len(tspecs), len(pending))
    return pending, current


def _prepare_data(tasks: list[str], opts: RunOptions) -> None:
    """Generate the datasets the pending tasks make on first use (digits_c's 75 splits) once, before the jobs."""
    from .data import resolve_dataset
    from .parallel import generated_refs
    from .tasks import get_task_spec

    refs = generated_refs([get_task_spec(t) for t in tasks])
    if refs:
        log.info("preparing %d generated dataset splits (%s) before submitting", len(refs), refs[0].split(":")[0])
    for ref in refs:
        resolve_dataset(ref, opts.data_root)


def make_executor(launch: LaunchOptions, log_dir: Path) -> Any:
    """A submitit executor for ``launch``: one node per job, one process per GPU."""
    submitit = require_submitit()
    executor = submitit.AutoExecutor(folder=str(log_dir), cluster=launch.launcher)  # files named by job id
    params: dict[str, Any] = dict(name="prosmin-bench", timeout_min=launch.time_min, nodes=1,
                                  tasks_per_node=launch.processes, cpus_per_task=launch.cpus_per_task)
    if launch.gpus_per_job or launch.launcher == "local":  # local 0: CUDA_VISIBLE_DEVICES="" (no GPU)
        params["gpus_per_node"] = launch.gpus_per_job  # sbatch: no --gpus-per-node=0 (some clusters refuse it)
    if launch.launcher == "slurm":
        params.update(slurm_partition=launch.partition, slurm_signal_delay_s=launch.signal_delay_s)
        if launch.account:
            params["slurm_account"] = launch.account
        if launch.mem is not None:
            params["slurm_mem"] = f"{math.ceil(launch.mem / (1 << 20))}M"
    executor.update_parameters(**params)
    return executor


def _failure(exc: BaseException) -> str:
    """One line on why a submitit job failed: the last line of the job's traceback (submitit's FailedJobError puts
    it between two lines of dashes), else the first two lines ("Job ... has not produced any output (state: ...)",
    a job killed from outside)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    rules = [i for i, ln in enumerate(lines) if len(ln) > 3 and set(ln) == {"-"}]
    trace = [ln for ln in lines[rules[0] + 1 : rules[1]] if ln] if len(rules) >= 2 else []
    return (trace[-1] if trace else " ".join(ln for ln in lines[:2] if ln) or type(exc).__name__)[:300]


def _collect(jobs: list[Any], pairs: list[tuple[str, str]], names: list[str], opts: RunOptions) -> list[list[Any]]:
    """Wait for ``jobs``; a job that failed (killed, out of memory) leaves an error record for its pair unless a
    result is there."""
    from .runner import error_records
    from .tasks import get_task_spec

    out = []
    for job, (_, task), name in zip(jobs, pairs, names):
        try:
            out.append(job.results()[0])  # rank 0's records
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError, with the job's stderr tail
            err = ProsminBenchError(f"job {job.job_id} failed ({_failure(exc)}); its log: {job.paths.stderr}")
            log.error("%s / %s: %s", name, task, err)
            out.append(error_records(name, [get_task_spec(task)], err, opts))
    return out


def evaluate(chosen: Selection, opts: RunOptions, launch: LaunchOptions) -> list[Record] | Submitted:
    """Evaluate ``chosen.models`` x ``chosen.tasks`` as submitit jobs; the records in the serial order (model by
    model), or, for SLURM without ``wait``, what was submitted."""
    require_submitit()
    opts = _absolute(replace(opts, jobs=1))
    models, tasks = list(chosen.models), list(chosen.tasks)
    resolved = _check_inputs(models, tasks, opts, launch)
    pending, current = pending_pairs(tasks, opts, resolved)
    found: dict[tuple[int, int], list[Any]] = {ik: [rec] for ik, rec in current.items()}
    if pending:
        log_dir = Path(launch.log_dir or Path(opts.results_dir) / ".submitit").expanduser().absolute()
        executor = make_executor(launch, log_dir)
        _prepare_data(sorted({tasks[k] for _, k in pending}), opts)
        wave = len(pending) if launch.launcher == "slurm" else max(1, threads.usable_cores() // launch.processes)
        share = 1 if launch.launcher == "slurm" else min(wave, len(pending)) * launch.processes
        job = GridJob(opts, processes=launch.processes, share=share,
                      log_level=logging.getLogger("prosmin_bench").getEffectiveLevel(),
                      card_dirs=tuple(str(d.absolute()) for d in cards.user_card_dirs()))
        for start in range(0, len(pending), wave):  # local: at most `wave` jobs at once on this machine
            part = pending[start : start + wave]
            pairs = [(models[i], tasks[k]) for i, k in part]
            jobs = executor.map_array(job, [m for m, _ in pairs], [t for _, t in pairs])  # one job array
            log.info("submitted %d job(s) (%s); logs in %s", len(jobs), ", ".join(j.job_id for j in jobs[:4]) +
                     (", ..." if len(jobs) > 4 else ""), log_dir)
            if launch.launcher == "slurm" and not launch.wait:
                return Submitted([(j.job_id, m, t) for j, (m, t) in zip(jobs, pairs)], log_dir, len(current),
                                 Path(opts.results_dir))
            try:
                done = _collect(jobs, pairs, [resolved[i][0].name for i, _ in part], opts)
            except BaseException:  # Ctrl-C here: end the local jobs too; SLURM jobs go on
                if launch.launcher == "local":
                    for j in jobs:
                        j.cancel(check=False)
                else:
                    log.warning("the SLURM jobs go on without this process: `scancel %s` stops them",
                                jobs[0].job_id.split("_")[0])
                raise
            found.update(dict(zip(part, done)))
    return [rec for i in range(len(models)) for k in range(len(tasks)) for rec in found.get((i, k), [])]
