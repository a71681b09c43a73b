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

from .errors import ProsminBenchError
from .metrics import MetricArgumentError

log = logging.getLogger("prosmin_bench")

EXAMPLES = """examples:
  prosmin-bench run                                    # the mini suite: pretrain missing micro models, evaluate, leaderboard
  prosmin-bench run --model random_micro --task digits_knn --task digits_linear
  prosmin-bench run --model prosmin_vits16 --task imagenet_c --data-root /data
  prosmin-bench run --suite imagenet --model dino_vits16 --model ibot_vits16 --weights-dir /ckpts
  torchrun --nproc_per_node=8 -m prosmin_bench run --suite imagenet --model dino_vits16 --data-root /data --precision bf16
  prosmin-bench list models | tasks
  prosmin-bench pretrain --recipe prosmin_micro [--epochs N] [--out DIR]
  torchrun --nproc_per_node=8 -m prosmin_bench pretrain --recipe prosmin_vits16_in1k --data-root /data
  prosmin-bench leaderboard                            # your runs ($PROSMIN_BENCH_HOME/results)
  prosmin-bench leaderboard --results leaderboards/results --out leaderboards   # the committed pages + figures/
  prosmin-bench data check --data-root /data
"""


def int_in(low: int, high: int, what: str):
    """An argparse ``type=``: an integer in [low, high]. A value out of range is a usage error at parse time, not an
    error record for every (model, task) pair after the models have loaded."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected at most {high}, got {value}")
        return value

    return parse


# Upper bounds catch typos (an extra digit or three) before they turn into an out-of-memory failure mid-run.
positive_batch = int_in(1, 1 << 16, "a positive integer")
non_negative_workers = int_in(0, 1024, "a non-negative integer")
positive_workers = int_in(1, 1024, "a positive integer")
positive_epochs = int_in(1, 1_000_000, "a positive integer")
severity = int_in(1, 5, "a severity from 1 to 5")

#: --max-memory bounds: below 1 MiB no k-NN block fits; 1 PiB is beyond any machine.
MEMORY_RANGE = (1 << 20, 1 << 50)


def _parse_memory(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    t = text.strip().lower().rstrip("b").rstrip("i")
    expected = "expected a size from 1M to 1P like 16G, 512M or 1073741824"
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not MEMORY_RANGE[0] <= value <= MEMORY_RANGE[1]:  # also nan and inf, which fail both comparisons
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    return int(value)


def _seeds(text: str) -> tuple[int, ...]:
    from .results import MAX_SEED, seeds_problem

    expected = f"expected distinct integer seeds from 0 to {MAX_SEED} like '0,1,2'"
    try:
        seeds = tuple(int(s) for s in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, but got {text!r}") from None
    problem = seeds_problem(seeds)
    if problem is not None:  # a repeated seed would be counted twice in the mean and the std
        raise argparse.ArgumentTypeError(f"{expected}, but got {text!r}: {problem}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prosmin-bench", description=__doc__.splitlines()[0] if __doc__ else None,
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--cards", action="append", default=[], metavar="DIR", help="extra folder of task/model cards")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", help="evaluate models on tasks (default: the mini suite)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--model", action="append", default=[], help="model name (repeatable)")
    r.add_argument("--task", action="append", default=[], help="task name (repeatable)")
    r.add_argument("--suite", choices=["mini", "imagenet"], help="all tasks (and, without --model, all models) of a suite")
    r.add_argument("--seeds", type=_seeds, default=None, help="seeds, e.g. 0,1,2 (default 0,1,2 for the mini suite, else 0)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="feature extraction autocast")
    r.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of cached features (float16 halves the cache of ImageNet-size banks)")
    r.add_argument("--data-hash", choices=["stat", "content"], default="stat",
                   help="how image files enter the feature cache key: stat (path, size, mtime; no image read) or "
                        "content (sha256 of every file; reads the whole dataset)")
    r.add_argument("--batch-size", type=positive_batch, default=256)
    r.add_argument("--num-workers", type=non_negative_workers, default=None, help="data loader workers (default: from the machine)")
    r.add_argument("--max-memory", type=_parse_memory, default="1G", help="working memory for k-NN blocks, e.g. 4G")
    r.add_argument("--data-root", type=Path, default=None, help="ImageNet-scale data root (see `data check`)")
    r.add_argument("--weights", default=None, help="checkpoint path for the one --model")
    r.add_argument("--weights-dir", default=None, help="folder searched first for official weights")
    r.add_argument("--results", type=Path, default=None,
                   help="results folder (default $PROSMIN_BENCH_HOME/results, i.e. ~/.cache/prosmin-bench/results; "
                        "the committed records are rewritten only with --results leaderboards/results)")
    r.add_argument("--overwrite", action="store_true", help="recompute records that exist")
    r.add_argument("--no-pretrain", action="store_true", help="do not pretrain missing micro models")
    r.add_argument("--leaderboard", type=Path, default=None, metavar="FILE.md|DIR",
                   help="also write the leaderboard: one markdown file, or suite pages + figures into DIR")

    ls = sub.add_parser("list", help="list models or tasks")
    ls.add_argument("what", choices=["models", "tasks", "recipes", "datasets"])

    pt = sub.add_parser("pretrain", help="pretrain a recipe (ProSMin, DINO, iBOT, MoCo-v3)")
    pt.add_argument("--recipe", required=True)
    pt.add_argument("--epochs", type=positive_epochs, default=None)
    pt.add_argument("--out", type=Path, default=None)
    pt.add_argument("--resume", action="store_true")
    pt.add_argument("--device", default="auto")
    pt.add_argument("--data-root", type=Path, default=None)
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")

    lb = sub.add_parser("leaderboard", help="render the leaderboard markdown from result files")
    lb.add_argument("--results", type=Path, default=None,
                    help="results folder (default $PROSMIN_BENCH_HOME/results; the committed ones: leaderboards/results)")
    lb.add_argument("--out", type=Path, default=None, metavar="FILE.md|DIR",
                    help="a markdown file, or a folder for mini.md / imagenet.md and their figures (e.g. leaderboards)")
    lb.add_argument("--suite", choices=["mini", "imagenet"], default=None)

    d = sub.add_parser("data", help="check data or build ImageNet-C")
    dsub = d.add_subparsers(dest="data_command")
    dc = dsub.add_parser("check", help="what is present, missing, and how to get it")
    dc.add_argument("--data-root", type=Path, default=None)
    mc = dsub.add_parser("make-imagenet-c", help="build ImageNet-C from ImageNet val with the reference corruptions")
    mc.add_argument("--data-root", type=Path, required=True)
    mc.add_argument("--workers", type=positive_workers, default=None)
    mc.add_argument("--corruption", action="append", default=[])
    mc.add_argument("--severity", action="append", type=severity, default=[])
    return p


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("prosmin_bench")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def cmd_run(a: argparse.Namespace) -> int:
    from . import config, leaderboard
    from .runner import RunOptions, evaluate, suite_models, suite_tasks

    suite = a.suite or (None if (a.model or a.task) else "mini")
    if suite is None and a.model and not a.task:
        # `run --model X`: every task of the models' own suite (mini models -> digits tasks)
        from .models.zoo import get_model_spec

        scales = {get_model_spec(m).scale for m in a.model}
        if len(scales) == 1:
            suite = scales.pop()
    models = list(a.model) or (suite_models(suite) if suite else [])
    tasks = list(a.task) or (suite_tasks(suite) if suite else [])
    if not models:
        raise ProsminBenchError("No model given: pass --model NAME (see `prosmin-bench list models`) or --suite")
    if not tasks:
        raise ProsminBenchError("No task given: pass --task NAME (see `prosmin-bench list tasks`) or --suite")
    seeds = a.seeds or ((0, 1, 2) if suite == "mini" else (0,))
    from . import distributed
    from .features import default_num_workers

    # Loader workers only pay off for files on disk (ImageNet scale); the mini data lives in memory.
    workers = a.num_workers if a.num_workers is not None else (default_num_workers() if a.data_root else 0)
    opts = RunOptions(
        seeds=seeds, device=a.device, results_dir=a.results or config.default_results_dir(),
        data_root=config.data_root(a.data_root), weights=a.weights, weights_dir=a.weights_dir,
        overwrite=a.overwrite, precision=a.precision, feature_dtype=a.feature_dtype, data_hash=a.data_hash,
        batch_size=a.batch_size, num_workers=workers,
        max_memory=a.max_memory if isinstance(a.max_memory, int) else _parse_memory(a.max_memory),
        pretrain_missing=not a.no_pretrain,
    )
    if a.leaderboard is not None:  # a page that cannot be written must not wait until after all the work
        leaderboard.check_destination(a.leaderboard, "--leaderboard")
    records = evaluate(models, tasks, options=opts)
    if not distributed.is_main():  # under torchrun only rank 0 reports
        distributed.destroy()
        return 0
    distributed.destroy()
    failed = [r for r in records if getattr(r, "record_type", "") == "error"]
    text = leaderboard.render(opts.results_dir, suite=suite)
    if a.leaderboard:
        if a.leaderboard.suffix.lower() == ".md":
            leaderboard.write(opts.results_dir, a.leaderboard, suite=suite)
        else:
            leaderboard.write_suite_pages(opts.results_dir, a.leaderboard)
    sys.stdout.write(text)
    if failed:  # the suite went on past each failure; the exit status still says that something needs fixing
        first = failed[0]
        sys.stderr.write(
            f"prosmin-bench: error: {len(failed)} of {len(records)} (model, task) pairs failed (see 'Failed runs'); "
            f"{first.model} / {first.task}: {first.message} (finished results are kept; a re-run redoes only what "
            "is missing or failed)\n"
        )
        return 1
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from tabulate import tabulate

    if a.what == "models":
        from .models.zoo import catalogue

        rows = [[n, s.arch, s.weights.kind, s.method, s.scale, s.description[:70]] for n, s in catalogue().items()]
        sys.stdout.write(tabulate(rows, ["model", "arch", "weights", "method", "scale", "description"]) + "\n")
    elif a.what == "tasks":
        from .tasks import catalogue

        rows = [[n, s.kind, s.version, s.suite, s.main_score] for n, s in catalogue().items()]
        sys.stdout.write(tabulate(rows, ["task", "kind", "version", "suite", "main score"]) + "\n")
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
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    if a.command is None:  # `prosmin-bench` alone = the mini suite
        a = parser.parse_args([*argv, "run"])
    _setup_logging(a.debug, a.quiet)
    # Only the main thread may set handlers (main() called from a worker thread keeps the process's own).
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading.current_thread() is \
        threading.main_thread() else None
    try:
        from . import cards

        for d in a.cards:
            cards.add_card_dir(d)
        return COMMANDS[a.command](a)
    except (ProsminBenchError, MetricArgumentError) as exc:
        if a.debug:
            raise
        from .runner import one_line

        msg = one_line(exc)
        sys.stderr.write(f"prosmin-bench: error: {msg}\n")
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt as exc:
        return _interrupted(a, exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
