"""The command line's grammar: argument types that refuse bad values at parse time, and the parser itself.

``cli.py`` holds what each command does; this module only says what each one accepts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .record_schema import MAX_SEED, seeds_problem

#: First line of ``prosmin-bench --help``.
DESCRIPTION = "Command line: thin; every subcommand fills a typed options object and makes one library call."

EXAMPLES = """examples:
  prosmin-bench run                                    # the mini suite: evaluate (shipped micro checkpoints), summary
  prosmin-bench run --jobs 1 --threads 2               # one model at a time with two threads (default: a job per core)
  prosmin-bench run --model random_micro --task digits_knn --task digits_linear
  prosmin-bench run --model prosmin_vits16 --task imagenet_c --data-root /data
  prosmin-bench run --suite imagenet --model dino_vits16 --model ibot_vits16 --weights-dir /ckpts
  torchrun --nproc_per_node=8 -m prosmin_bench run --suite imagenet --model dino_vits16 --data-root /data --precision bf16
  prosmin-bench run --suite imagenet --data-root /data --launcher slurm --slurm-partition gpu   # docs/cluster.md
  prosmin-bench list models | tasks
  prosmin-bench pretrain --recipe prosmin_micro [--epochs N] [--out DIR]
  torchrun --nproc_per_node=8 -m prosmin_bench pretrain --recipe prosmin_vits16_in1k --data-root /data
  prosmin-bench leaderboard                            # your runs ($PROSMIN_BENCH_HOME/results)
  prosmin-bench leaderboard --results leaderboards/results --out leaderboards   # the committed pages + figures/
  prosmin-bench data check --data-root /data
"""


PROGRESS_HELP = ("progress of long work (extraction, probe sweeps, fits, epochs, pairs): auto = bars on a terminal, "
                 "a log line every 30 s otherwise (SLURM logs, pipes); on = bars always; off = none "
                 "(default: auto, off with -q)")


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


def parse_memory(text: str) -> int:
    """``--max-memory``: bytes from a size like ``16G``, ``512M`` or ``1073741824``."""
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


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: distinct integers separated by commas or spaces."""
    expected = f"expected distinct integer seeds from 0 to {MAX_SEED} like '0,1,2'"
    try:
        seeds = tuple(int(s) for s in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, but got {text!r}") from None
    problem = seeds_problem(seeds)
    if problem is not None:  # a repeated seed would be counted twice in the mean and the std
        raise argparse.ArgumentTypeError(f"{expected}, but got {text!r}: {problem}")
    return seeds


def names(text: str) -> list[str]:
    """``--model a,b`` / ``--task a,b``: a comma-separated list (as ``mteb run -m`` / ``lm_eval --tasks``)."""
    out = [n.strip() for n in text.split(",") if n.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected a name or a comma-separated list of names, but got {text!r}")
    return out


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("prosmin-bench")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prosmin-bench", description=DESCRIPTION,
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--cards", action="append", default=[], metavar="DIR", help="extra folder of task/model cards")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress")
    p.add_argument("--progress", choices=["auto", "on", "off"], default=None, help=PROGRESS_HELP)
    # The same flags after the subcommand (`prosmin-bench run -q`); SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as before the subcommand")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="as before the subcommand")
    common.add_argument("--progress", choices=["auto", "on", "off"], default=argparse.SUPPRESS,
                        help="as before the subcommand")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", parents=[common], help="evaluate models on tasks (default: the mini suite)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--model", action="extend", type=names, default=[],
                   help="model name(s): repeatable or comma-separated, e.g. dino_micro,ibot_micro (default: the suite's)")
    r.add_argument("--task", action="extend", type=names, default=[],
                   help="task name(s): repeatable or comma-separated (default: the suite's)")
    r.add_argument("--suite", choices=["mini", "imagenet"], help="all tasks (and, without --model, all models) of a suite")
    r.add_argument("--seeds", type=parse_seeds, default=None, help="seeds, e.g. 0,1,2 (default 0,1,2 for the mini suite, else 0)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, CUDA when present)")
    r.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast of the forward passes (default fp32: the baselines' eval scripts run in float32)")
    r.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of cached features (float16 halves the cache of ImageNet-size banks)")
    r.add_argument("--data-hash", choices=["stat", "content"], default="stat",
                   help="how image files enter the feature cache key: stat (path, size, mtime; no image read) or "
                        "content (sha256 of every file; reads the whole dataset)")
    r.add_argument("--batch-size", type=positive_batch, default=256,
                   help="images per forward pass (default 256: DINO's eval_knn.py / eval_linear.py per-GPU batch)")
    r.add_argument("--num-workers", type=non_negative_workers, default=None, help="data loader workers (default: from the machine)")
    r.add_argument("--max-memory", type=parse_memory, default="1G",
                   help="working memory for k-NN blocks and linear_aug's feature memo, e.g. 4G")
    r.add_argument("--knn-backend", choices=["torch", "faiss"], default="torch",
                   help="exact k-NN search: torch (default) or faiss (IndexFlatIP, on the GPU where faiss has GPU "
                        "support; pip install 'prosmin-bench[faiss]')")
    r.add_argument("--data-root", type=Path, default=None, help="ImageNet-scale data root (see `data check`)")
    r.add_argument("--weights", default=None, help="checkpoint path for the one --model")
    r.add_argument("--weights-dir", default=None, help="folder searched first for official weights")
    r.add_argument("--results", type=Path, default=None,
                   help="results folder (default $PROSMIN_BENCH_HOME/results, i.e. ~/.cache/prosmin-bench/results; "
                        "the committed records are rewritten only with --results leaderboards/results)")
    r.add_argument("--overwrite", action="store_true", help="recompute records that exist")
    r.add_argument("--no-pretrain", action="store_true", help="do not pretrain missing micro models")
    r.add_argument("--no-shipped", action="store_true",
                   help="pretrain the micro models here instead of using the checkpoints shipped in the package")
    r.add_argument("--jobs", type=positive_workers, default=None,
                   help="models evaluated at once in worker processes (default: one per core for CPU runs)")
    r.add_argument("--threads", type=positive_workers, default=None,
                   help="intra-op threads per job (default: the cores shared by the jobs; or $PROSMIN_BENCH_THREADS)")
    r.add_argument("--leaderboard", type=Path, default=None, metavar="FILE.md|DIR",
                   help="also write the leaderboard: one markdown file, or suite pages + figures into DIR")
    # Cluster grids (prosmin_bench/launcher.py, docs/cluster.md): one submitit job per (model, task).
    r.add_argument("--launcher", choices=["none", "local", "slurm"], default="none",
                   help="none: evaluate in this process (default); local: one submitit job per (model, task) on "
                        "this machine; slurm: the (model, task) pairs as one SLURM job array (needs submitit)")
    r.add_argument("--slurm-partition", default=None, metavar="P", help="SLURM partition (required for slurm)")
    r.add_argument("--gpus-per-job", type=int_in(0, 64, "an integer from 0 to 64"), default=None, metavar="G",
                   help="GPUs of each job, one process each, on one node (default 1; 0: a CPU job)")
    r.add_argument("--slurm-time", type=int_in(1, 1_000_000, "a positive number of minutes"), default=None,
                   metavar="MINUTES", help="time limit of each job (default 1440); a job cut off is requeued")
    r.add_argument("--slurm-cpus-per-task", type=positive_workers, default=None, metavar="N",
                   help="CPU cores per process (default 10, as DINO's run_with_submitit.py)")
    r.add_argument("--slurm-mem", type=parse_memory, default=None, metavar="SIZE",
                   help="memory per job, e.g. 64G (default: the partition's default)")
    r.add_argument("--slurm-account", default=None, metavar="NAME", help="SLURM account to charge (default: yours)")
    r.add_argument("--slurm-log-dir", type=Path, default=None, metavar="DIR",
                   help="submitit's job files and logs (default <results>/.submitit)")
    r.add_argument("--wait", action="store_true",
                   help="slurm: wait for the jobs, then print the run's table (local always waits)")

    ls = sub.add_parser("list", parents=[common], help="list models or tasks")
    ls.add_argument("what", choices=["models", "tasks", "recipes", "datasets"], help="what to list")

    pt = sub.add_parser("pretrain", parents=[common], help="pretrain a recipe (ProSMin, DINO, iBOT, MoCo-v3)")
    pt.add_argument("--recipe", required=True, help="recipe name (`prosmin-bench list recipes`), e.g. prosmin_micro")
    pt.add_argument("--epochs", type=positive_epochs, default=None,
                    help="override the recipe's epochs; schedules span the new length (default: the recipe's)")
    pt.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="folder for checkpoint.pt and log.jsonl (default: $PROSMIN_BENCH_HOME/checkpoints/<recipe>)")
    pt.add_argument("--resume", action="store_true",
                    help="continue the checkpoint in --out where it stopped (the same recipe config is required)")
    pt.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, CUDA when present)")
    pt.add_argument("--data-root", type=Path, default=None,
                    help="ImageNet-scale data root for ImageNet recipes (default: $PROSMIN_BENCH_DATA)")
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    pt.add_argument("--threads", type=positive_workers, default=None,
                    help="intra-op threads (default: the usable cores; or $PROSMIN_BENCH_THREADS)")

    lb = sub.add_parser("leaderboard", parents=[common], help="render the leaderboard markdown from result files")
    lb.add_argument("--results", type=Path, default=None,
                    help="results folder (default $PROSMIN_BENCH_HOME/results; the committed ones: leaderboards/results)")
    lb.add_argument("--out", type=Path, default=None, metavar="FILE.md|DIR",
                    help="a markdown file, or a folder for mini.md / imagenet.md and their figures (e.g. leaderboards)")
    lb.add_argument("--suite", choices=["mini", "imagenet"], default=None,
                    help="only this suite's page (default: every suite with results)")

    d = sub.add_parser("data", parents=[common], help="check data or build ImageNet-C")
    dsub = d.add_subparsers(dest="data_command")
    dc = dsub.add_parser("check", parents=[common], help="what is present, missing, and how to get it (exit status 1 if anything is)")
    dc.add_argument("--data-root", type=Path, default=None,
                    help="ImageNet-scale data root (default: $PROSMIN_BENCH_DATA)")
    dc.add_argument("--task", action="extend", type=names, default=[],
                    help="check only these tasks (repeatable or comma-separated; default: all)")
    mc = dsub.add_parser("make-imagenet-c", parents=[common], help="build ImageNet-C from ImageNet val with the reference corruptions")
    mc.add_argument("--data-root", type=Path, required=True,
                    help="folder holding imagenet/val/<wnid>/*.JPEG; writes <data-root>/imagenet-c/")
    mc.add_argument("--workers", type=positive_workers, default=None,
                    help="parallel processes (default: the CPU count)")
    mc.add_argument("--corruption", action="append", default=[],
                    help="only this corruption (repeatable; default: all 15)")
    mc.add_argument("--severity", action="append", type=severity, default=[],
                    help="only this severity, 1-5 (repeatable; default: all 5)")
    return p
