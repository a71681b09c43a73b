"""Command line: thin; every subcommand fills a typed options object and makes one library call.

Errors a user can fix print one line on stderr and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from . import cards
from .cli_args import build_parser, parse_memory
from .errors import ProsminBenchError, one_line

log = logging.getLogger("prosmin_bench")

# Each command imports the layer it calls when it runs (not at the top of this module), so `--help` and argument
# errors answer without loading the models, data and evaluation stack.


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was when main() ran: main() may run many
    times in one process (tests, notebooks), and a handler bound to an earlier, since closed stderr would print
    "--- Logging error ---" with a traceback for every library log line that follows."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property above always wins
        pass


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("prosmin_bench")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def cmd_run(a: argparse.Namespace) -> int:
    from . import config, distributed, launcher, leaderboard, parallel, suite, threads
    from .features import default_num_workers
    from .leaderboard.console import run_table, where_next
    from .reuse import folder_stamps, reused_pairs
    from .runner import RunOptions

    chosen = suite.select(a.model, a.task, a.suite)  # which models, tasks and default seeds
    launch = launcher.from_args(a)  # None: in this process; refuses launcher flags without --launcher
    jobs = 1 if launch else min(a.jobs, len(chosen.models)) if a.jobs is not None else parallel.default_jobs(
        len(chosen.models), a.device)
    threads.apply(a.threads, jobs=jobs)  # this process's share; each --jobs worker applies its own
    # Loader workers only pay off for files on disk (ImageNet scale); the mini data lives in memory.
    workers = a.num_workers if a.num_workers is not None else (default_num_workers() if a.data_root else 0)
    opts = RunOptions(
        seeds=a.seeds or chosen.seeds, device=a.device, results_dir=a.results or config.default_results_dir(),
        data_root=config.data_root(a.data_root), weights=a.weights, weights_dir=a.weights_dir,
        overwrite=a.overwrite, precision=a.precision, feature_dtype=a.feature_dtype, data_hash=a.data_hash,
        batch_size=a.batch_size, num_workers=workers,
        max_memory=a.max_memory if isinstance(a.max_memory, int) else parse_memory(a.max_memory),
        knn_backend=a.knn_backend,
        pretrain_missing=not a.no_pretrain, shipped=not a.no_shipped, jobs=jobs, threads=a.threads,
    )
    if a.leaderboard is not None:  # a page that cannot be written must not wait until after all the work
        leaderboard.check_destination(a.leaderboard, "--leaderboard")
    before = folder_stamps(opts.results_dir)  # tells the records this run computes from those it reuses
    if launch is not None:  # submitit jobs, one per (model, task); missing micro models are pretrained first
        records = launcher.evaluate(chosen, opts, launch)
        if isinstance(records, launcher.Submitted):  # SLURM without --wait: the job ids and the log folder
            sys.stdout.write(records.describe())
            return 0
    else:
        records = suite.evaluate(chosen.models, chosen.tasks, options=opts)  # pretrains missing micro models first
    if not distributed.is_main():  # under torchrun only rank 0 reports
        distributed.destroy()
        return 0
    distributed.destroy()
    failed = [r for r in records if getattr(r, "record_type", "") == "error"]
    written = []
    if a.leaderboard:
        if a.leaderboard.suffix.lower() == ".md":
            written = [leaderboard.write(opts.results_dir, a.leaderboard, suite=chosen.suite)]
        else:
            written = [p for p in leaderboard.write_suite_pages(opts.results_dir, a.leaderboard) if p.suffix == ".md"]
    # What this run did, compactly; the full page (every result in the folder) is one command away.
    sys.stdout.write(run_table(records, reused_pairs(records, opts.results_dir, before)) + "\n" +
                     where_next(opts.results_dir, written))
    if failed:  # the suite went on past each failure; the exit status still says that something needs fixing
        first = failed[0]
        sys.stderr.write(
            f"prosmin-bench: error: {len(failed)} of {len(records)} (model, task) pairs failed (see 'Failed runs'); "
            f"{first.model} / {first.task}: {first.message} (finished results are kept; a re-run redoes only what "
            "is missing or failed)\n"
        )
        return 1
    return 0


def _origin(origin: str) -> str:
    """Where a card came from, for ``list``: ``built-in``, a shipped card relative to the checkout or package, or a
    user card's full path."""
    from pathlib import Path

    path = Path(origin)
    if path.suffix != ".toml":  # "built-in"
        return origin
    path, root = path.resolve(), Path(__file__).resolve().parent
    for base in (root.parent, root / "_cards"):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


def cmd_list(a: argparse.Namespace) -> int:
    from tabulate import tabulate

    if a.what == "models":
        from .models.zoo import catalogue

        reg = catalogue()
        rows = [[n, s.arch, s.weights.kind, s.method, s.scale, _origin(reg.origin(n)), s.description[:60]]
                for n, s in reg.items()]
        header = ["model", "arch", "weights", "method", "scale", "origin", "description"]
        sys.stdout.write(tabulate(rows, header) + "\n")
    elif a.what == "tasks":
        from .tasks.spec import task_index  # the cards only: no kind module, no torch

        reg = task_index()
        rows = [[n, s.kind, s.version, s.suite, s.main_score, _origin(reg.origin(n))] for n, s in reg.items()]
        sys.stdout.write(tabulate(rows, ["task", "kind", "version", "suite", "main score", "origin"]) + "\n")
    elif a.what == "datasets":
        from .data import DATASETS

        rows = [[n, s.version, s.scale, ",".join(s.splits), s.source] for n, s in DATASETS.items()]
        sys.stdout.write(tabulate(rows, ["dataset", "version", "scale", "splits", "source"]) + "\n")
    else:
        from .pretrain.recipes import RECIPES

        sys.stdout.write("\n".join(RECIPES.names()) + "\n")
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .pretrain import pretrain
    from .pretrain.config import parse_overrides

    from . import threads

    threads.apply(a.threads)
    overrides = parse_overrides(a.set)
    if a.data_root is not None:
        overrides.setdefault("data_root", str(a.data_root))
    path = pretrain(a.recipe, epochs=a.epochs, out_dir=a.out, resume=a.resume, device=a.device,
                    overrides=overrides or None)
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_leaderboard(a: argparse.Namespace) -> int:
    """No --out: print the page(s). --out FILE.md: that page (--suite, or every suite found) with figures/ beside
    it. --out DIR: one page per suite (DIR/mini.md, DIR/imagenet.md) with DIR/figures/<suite>/*.png."""
    from . import config, leaderboard

    results = a.results or config.default_results_dir()
    if a.out is not None:
        leaderboard.check_destination(a.out)
    if not Path(results).is_dir():
        raise ProsminBenchError(f"No results folder {str(results)!r}: run `prosmin-bench run` first, or pass "
                                "--results DIR with the folder your runs wrote to")
    if a.out is None:
        sys.stdout.write(leaderboard.render(results, suite=a.suite))
    elif a.out.suffix.lower() == ".md":
        sys.stdout.write(f"{leaderboard.write(results, a.out, suite=a.suite)}\n")
    else:
        suites = [a.suite] if a.suite else None
        for path in leaderboard.write_suite_pages(results, a.out, suites=suites):
            sys.stdout.write(f"{path}\n")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from . import datacli

    if a.data_command == "check":
        return datacli.check(a)
    if a.data_command == "make-imagenet-c":
        return datacli.make_imagenet_c(a)
    raise ProsminBenchError("Expected `prosmin-bench data check` or `prosmin-bench data make-imagenet-c`")


COMMANDS = {"run": cmd_run, "list": cmd_list, "pretrain": cmd_pretrain, "leaderboard": cmd_leaderboard, "data": cmd_data}


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send before killing a job) as an exception in the main thread, so the
    clean-up that Ctrl-C gets runs for it too: temporary files removed, locks released, a pretraining checkpoint
    written at the current step."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _interrupted(a: argparse.Namespace, exc: KeyboardInterrupt) -> int:
    """One line on stderr saying what is kept and how to go on; exit 130 (SIGINT) or 143 (SIGTERM), as a shell
    reports a process ended by that signal."""
    from . import distributed

    code = 143 if isinstance(exc, Terminated) else 130
    if not distributed.is_main():  # under torchrun every rank is signalled; rank 0 alone says it
        return code
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    saved = getattr(exc, "checkpoint", None)  # (path, step) when a pretraining loop saved where it stopped
    if a.command == "pretrain":
        line = (f"{what}; checkpoint of step {saved[1]} saved to {saved[0]}: run the same command with --resume to "
                "continue" if saved else f"{what} before this run saved a checkpoint; run the same command with "
                "--resume to continue from an earlier one, if any")
    elif saved:
        line = f"{what}; finished results and the pretraining (step {saved[1]}) are saved, run again to resume"
    else:
        line = f"{what}; finished results are saved, run again to resume"
    sys.stderr.write(f"prosmin-bench: {line}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    from . import threads

    threads.prepare_environment()  # before torch loads OpenMP: idle threads sleep instead of spinning (threads.py)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    if a.command is None:  # `prosmin-bench` alone: the help, not a run (a run pretrains and evaluates for minutes)
        parser.print_help()
        return 0
    _setup_logging(a.debug, a.quiet)
    from . import progress  # light: tqdm, no torch

    # Only the main thread may set handlers (main() called from a worker thread keeps the process's own).
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading.current_thread() is \
        threading.main_thread() else None
    try:
        for d in a.cards:
            cards.add_card_dir(d)
        with progress.using(progress.resolve(a.progress, a.quiet)):
            return COMMANDS[a.command](a)
    except (ProsminBenchError, ValueError) as exc:
        # A metric's argument error (metrics.MetricArgumentError, a ValueError) is the user's to fix as well; it can
        # only come from a loaded prosmin_bench.metrics, which the CLI does not import up front (a light --help).
        metrics = sys.modules.get("prosmin_bench.metrics")
        user = isinstance(exc, ProsminBenchError) or (
            metrics is not None and isinstance(exc, metrics.MetricArgumentError))
        if a.debug or not user:
            raise
        msg = one_line(exc)
        sys.stderr.write(f"prosmin-bench: error: {msg}\n")
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt as exc:
        return _interrupted(a, exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
