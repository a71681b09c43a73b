"""Benchmark: the README's first command on a fresh machine, then the same command again (issue 20).

1. ``first run``: ``prosmin-bench run`` (the default mini suite: every mini model on every digits task, seeds 0, 1,
   2) with a fresh ``PROSMIN_BENCH_HOME`` (no features, heads, generated data or checkpoints made here) and a fresh
   results folder, so everything is evaluated; the micro checkpoints come from the package
   (``prosmin_bench/_checkpoints``) unless ``--no-shipped``, which pretrains them here first.
2. ``cached re-run``: the same command again; every record is reused, only the leaderboard is rendered.

Prints each run's wall time, CPU time (user + sys of the command and its workers) and CPU use (CPU / wall; 2.0 =
both cores busy throughout), then the breakdown of the first run from its records: each task's ``wall_time_s``
summed over the models, each model's over its tasks, the pretraining and data-generation steps read from the log,
and what is left (start-up of the workers, the leaderboard, waiting on the slowest job).

Run: ``python benchmarks/bench_first_run.py [--jobs N] [--threads N] [--no-shipped] [--keep DIR] [--results DIR]``.
Targets (issue 20): first run <= 300 s and cached re-run <= 20 s on 2 idle cores; the script exits non-zero when a
run fails, and says whether each target was met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TARGET_FIRST_S = 300.0
TARGET_CACHED_S = 20.0


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, exit status) of ``cmd``, its stderr kept in ``log_path``."""
    cpu0, t0 = _cpu_children(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    return time.perf_counter() - t0, _cpu_children() - cpu0, proc.returncode


def log_steps(log_path: Path) -> dict[str, float]:
    """Seconds of the steps the log times itself: pretraining (first to last step line of each recipe) and the
    generated data (first to last 'generating digits_c' line)."""
    stamp = re.compile(r"^(\d\d):(\d\d):(\d\d) ")
    spans: dict[str, list[float]] = defaultdict(list)
    for line in log_path.read_text().splitlines():
        m = stamp.match(line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
        if "prosmin_bench.pretrain.train" in line:
            spans["pretraining (all recipes)"].append(t)
        elif "generating digits_c" in line:
            spans["digits_c generation"].append(t)
    return {k: (max(v) - min(v)) for k, v in spans.items() if len(v) > 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=None, help="passed to prosmin-bench run (default: its own)")
    ap.add_argument("--threads", type=int, default=None, help="passed to prosmin-bench run")
    ap.add_argument("--no-shipped", action="store_true", help="pretrain the micro models here (passed through)")
    ap.add_argument("--keep", type=Path, default=None, help="use this folder as the fresh home and keep it")
    ap.add_argument("--results", type=Path, default=None,
                    help="an empty results folder to write the records to (default: a fresh one beside the home); "
                         "`--results leaderboards/results` after emptying it regenerates the committed records")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="prosmin-first-run-"))
    if a.keep is not None and a.keep.exists() and any(a.keep.iterdir()):
        sys.exit(f"--keep {a.keep} is not empty: the first run needs a fresh home")
    work.mkdir(parents=True, exist_ok=True)
    home, results = work / "home", (a.results or work / "results")
    if a.results is not None and a.results.exists() and any(a.results.iterdir()):
        sys.exit(f"--results {a.results} is not empty: the first run needs a fresh results folder")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PROSMIN_BENCH_THREADS")}
    env.update(PROSMIN_BENCH_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    exe = shutil.which("prosmin-bench") or sys.exit("prosmin-bench is not installed: pip install -e .")
    cmd = [exe, "run", "--results", str(results)]
    cmd += ["--jobs", str(a.jobs)] if a.jobs else []
    cmd += ["--threads", str(a.threads)] if a.threads else []
    cmd += ["--no-shipped"] if a.no_shipped else []
    print(f"command: {' '.join(cmd[1:])}   (fresh PROSMIN_BENCH_HOME={home}; usable cores: "
          f"{len(os.sched_getaffinity(0))}; load average before: {os.getloadavg()[0]:.2f})")
    first = timed(cmd, env, work / "first.log")
    cached = timed(cmd, env, work / "cached.log")
    status = 0
    print(f"\n{'run':<16}{'wall s':>9}{'CPU s':>9}{'CPU/wall':>10}{'target s':>10}  met")
    for name, (wall, cpu, rc), target in (("first run", first, TARGET_FIRST_S), ("cached re-run", cached,
                                                                                   TARGET_CACHED_S)):
        print(f"{name:<16}{wall:>9.1f}{cpu:>9.1f}{cpu / wall:>10.2f}{target:>10.0f}  {'yes' if wall <= target else 'NO'}"
              + (f"  (exit status {rc}; log {work / 'first.log'})" if rc else ""))
        status |= rc
    by_task: dict[str, float] = defaultdict(float)
    by_model: dict[str, float] = defaultdict(float)
    execution = None
    for path in sorted(results.glob("*/*.json")):
        rec = json.loads(path.read_text())
        if rec.get("record_type") != "result":
            continue
        by_task[rec["task"]] += rec.get("wall_time_s", 0.0)
        by_model[rec["model"]] += rec.get("wall_time_s", 0.0)
        execution = execution or rec.get("execution")
    total = sum(by_task.values())
    print(f"\nfirst run, by task (record wall_time_s summed over {len(by_model)} models; {total:.0f} s in all):")
    for task, s in sorted(by_task.items(), key=lambda kv: -kv[1]):
        print(f"  {task:<24}{s:>8.1f} s  {100 * s / max(total, 1e-9):5.1f} %")
    print("first run, by model:")
    for model, s in sorted(by_model.items(), key=lambda kv: -kv[1]):
        print(f"  {model:<24}{s:>8.1f} s")
    for step, s in log_steps(work / "first.log").items():
        print(f"  {step:<24}{s:>8.1f} s (from the log)")
    if execution:
        print(f"threads per job: {execution.get('intra_op_threads')}, jobs: {execution.get('jobs')}, "
              f"OMP_WAIT_POLICY={execution.get('env', {}).get('OMP_WAIT_POLICY')}")
    jobs = (execution or {}).get("jobs") or 1
    print(f"records' work / jobs = {total / jobs:.0f} s of the first run's {first[0]:.0f} s wall; the rest is start-up "
          "(workers importing torch), the leaderboard and the wait for the last job")
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
