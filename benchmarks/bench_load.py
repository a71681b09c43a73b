"""Benchmark: speed under load. A micro pretraining step and a feature-extraction batch, idle and beside a
competing job that keeps every core busy, under several CPU thread policies side by side.

Workloads (timed one after the other in each policy's process):

- ``pretrain``: one ``dino_micro`` training step at batch 64 as ``pretrain/train.py`` runs it: the next multi-crop
  batch (tensor augmentation of the digits), forward, backward, per-parameter clipping, AdamW step, EMA update.
- ``extract``: one ``random_micro`` (vit_micro, 32 px) forward under ``no_grad`` on a batch of 256 digits images
  loaded and transformed beforehand (the batch ``features.extract`` runs at).

Loads (started by the benchmark's main process, killed at the end of their phase; they run with torch's
defaults, as a user's other job would):

- ``torch2``: one process multiplying 1024 x 1024 matrices in a loop with 2 threads;
- ``py2``: two processes each spinning a pure-Python loop;
- ``py1``: one such process, so one core stays free (not part of the pass/fail check, which is about both cores
  busy; it is where busy-waiting hurts most: a thread that finishes on the free core spins while its partner
  waits for a slice on the busy one).

Policies, each in its own fresh process (OpenMP reads its environment once, at start-up):

- ``torch-default``: no thread call and no OpenMP variable: what users got before (2 threads, libgomp's
  300,000-spin busy wait);
- ``new-default``: ``prosmin_bench.threads.prepare_environment()`` then ``apply(None)``, as the CLI does;
- ``1-thread``: the same with ``apply(1)``;
- with ``--policies all`` (or a comma-separated list of names) also ``spin0`` (2 threads, ``GOMP_SPINCOUNT=0``
  alone) and ``kmp0`` (2 threads, ``KMP_BLOCKTIME=0`` alone), to see which variable does the work.

All policy processes are started first (set-up and 2 warm-up calls each, untimed), then measured in rounds: in
each round the load of each phase (idle, torch2, py2, py1) is started once and every policy, in an order rotating by
round, runs one pretraining step and ``--batches`` extraction batches beside it. So all policies see the same
conditions within minutes, and a change in the machine's own background load shows in all of them alike (the
CPU other processes took during the idle calls is printed: it should be near 0). Prints per policy and workload
the median seconds idle and under each load with the ratio loaded / idle median, and the median CPU seconds per
call (CPU / wall > 1 means several busy threads; CPU far above the idle CPU means spinning). Exits 1 if
``new-default`` exceeds ``--max-ratio`` (2.5) under torch2 or py2.

Run: ``python benchmarks/bench_load.py [--rounds 4] [--batches 2] [--policies main|all|NAME,...]
[--max-ratio 2.5]``
(about 3 minutes on 2 cores with the main policies).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

#: Variables stripped from every child's environment, so each policy starts from the same place.
CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
         "PROSMIN_BENCH_THREADS")

#: name -> (extra environment, whether the worker calls prepare_environment(), its thread call: "none" | "apply"
#: | an explicit count)
POLICIES: dict[str, tuple[dict[str, str], bool, str | int]] = {
    "torch-default": ({}, False, "none"),
    "new-default": ({}, True, "apply"),
    "1-thread": ({}, True, 1),
    "spin0": ({"GOMP_SPINCOUNT": "0"}, False, 2),
    "kmp0": ({"KMP_BLOCKTIME": "0"}, False, 2),
}
MAIN_POLICIES = ("torch-default", "new-default", "1-thread")
PHASES = ("idle", "torch2", "py2", "py1")
#: The loads that keep both cores busy: the pass/fail check is on these.
CHECKED = ("torch2", "py2")

_TORCH_LOAD = """
import sys, torch
torch.set_num_threads(2)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
a @ b
print("busy", flush=True)
while True:
    a @ b
"""
_PY_LOAD = 'print("busy", flush=True)\nx = 0\nwhile True:\n    x += 1\n'


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CLEAN}


def start_load(kind: str) -> list[subprocess.Popen]:
    """Start the competing processes and wait until each is in its loop."""
    codes = {"torch2": [_TORCH_LOAD], "py2": [_PY_LOAD, _PY_LOAD], "py1": [_PY_LOAD]}[kind]
    procs = [subprocess.Popen([sys.executable, "-c", c], env=clean_env(), stdout=subprocess.PIPE, text=True)
             for c in codes]
    for p in procs:
        if p.stdout.readline().strip() != "busy":
            raise RuntimeError(f"load {kind} did not start")
    time.sleep(0.5)  # let the scheduler see them as running
    return procs


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def worker(policy: str, batches: int) -> None:
    """Serve one policy: set up, warm up, say ready; then for each ``measure`` line on stdin time one pretraining
    step and ``batches`` extraction batches and print their (wall, cpu) seconds as one JSON line."""
    _, prepare, how = POLICIES[policy]
    from prosmin_bench import threads

    if prepare:
        threads.prepare_environment()  # before torch: the CLI's order
    import torch

    if how == "apply":
        threads.apply(None)
    elif how != "none":
        torch.set_num_threads(int(how))

    import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers dino_micro)
    from prosmin_bench.data.bundled import load_digits_split
    from prosmin_bench.models import get_model
    from prosmin_bench.pretrain.data import PretrainData
    from prosmin_bench.pretrain.methods import Progress
    from prosmin_bench.pretrain.recipes import get_recipe
    from prosmin_bench.pretrain.schedules import autocast_context, clip_gradients_per_parameter, resolve_precision
    from prosmin_bench.pretrain.train import build_method

    dev = torch.device("cpu")
    cfg = get_recipe("dino_micro").config
    torch.manual_seed(0)
    data = PretrainData(cfg, dev)
    method = build_method(cfg).train()
    opt = torch.optim.AdamW(method.param_groups(), lr=1e-4)
    params = [p for _, p in method.trainable_named_parameters()]
    precision = resolve_precision(cfg.run.precision, dev)
    spe = data.steps_per_epoch
    total = cfg.optim.epochs * spe
    state = {"step": 0, "batches": data.batches(0)}

    def pretrain_step() -> None:
        s = state["step"]
        if s % spe == 0 and s:
            state["batches"] = data.batches(s // spe)
        batch = next(state["batches"])
        progress = Progress(step=s, total_steps=total, steps_per_epoch=spe)
        with autocast_context(precision, dev):
            loss, _ = method(batch, progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(progress)
        clip_gradients_per_parameter(params, cfg.optim.clip_grad)
        opt.step()
        method.update_target(method.momentum_at(progress))
        state["step"] = s + 1

    model = get_model("random_micro")
    loader = torch.utils.data.DataLoader(load_digits_split("train").with_transform(model.transform), batch_size=256)
    images = next(iter(loader))[0]

    def extract_batch() -> None:
        with torch.no_grad():
            model(images)

    def timed(fn) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c

    for _ in range(2):  # warm-up: kernels, allocator, thread pool
        pretrain_step()
        extract_batch()
    print(json.dumps({"info": threads.execution_info()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        busy0, own0, wall0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        res = {"pretrain": [timed(pretrain_step)], "extract": [timed(extract_batch) for _ in range(batches)]}
        if busy0 is not None:  # CPU seconds per second that other processes used meanwhile
            others = busy_cpu_seconds() - busy0 - (time.process_time() - own0)
            res["others"] = max(0.0, others) / (time.perf_counter() - wall0)
        print(json.dumps(res), flush=True)


class Worker:
    """A policy's measuring process, driven over its stdin and stdout."""

    def __init__(self, name: str, batches: int) -> None:
        self.name = name
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, "--batches", str(batches)],
                                     env={**clean_env(), **POLICIES[name][0]}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.times: dict[str, dict[str, list]] = {ph: {"pretrain": [], "extract": [], "others": []} for ph in PHASES}

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise RuntimeError(f"worker {self.name} failed:\n{self.err.read()[-3000:]}")
        return json.loads(line)

    def measure(self, phase: str) -> None:
        self.proc.stdin.write("measure\n")
        self.proc.stdin.flush()
        res = self.read()
        rec = self.times[phase]
        rec["pretrain"] += res["pretrain"]
        rec["extract"] += res["extract"]
        if "others" in res:
            rec["others"].append(res["others"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def summarise(name: str, times: dict) -> list[dict]:
    rows = []
    for workload in ("pretrain", "extract"):
        idle_med = statistics.median(w for w, _ in times["idle"][workload])
        for load in PHASES:
            ts = times[load][workload]
            wall = statistics.median(w for w, _ in ts)
            cpu = statistics.median(c for _, c in ts)
            rows.append({"policy": name, "workload": workload, "load": load, "wall": wall,
                         "ratio": wall / idle_med, "cpu": cpu, "n": len(ts)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each times one step per policy and load")
    ap.add_argument("--batches", type=int, default=2, help="extraction batches per policy, load and round")
    ap.add_argument("--policies", default="main", help="main, all, or names separated by commas")
    ap.add_argument("--max-ratio", type=float, default=2.5)
    ap.add_argument("--worker", choices=sorted(POLICIES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.batches)
        return 0

    start = time.perf_counter()
    names = {"main": MAIN_POLICIES, "all": tuple(POLICIES)}.get(a.policies) or tuple(a.policies.split(","))
    if "new-default" not in names or any(n not in POLICIES for n in names):
        ap.error(f"--policies: expected names from {sorted(POLICIES)} including new-default, but got {a.policies}")
    print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; load average at start "
          f"{os.getloadavg()[0]:.2f} (1 min); {a.rounds} rounds of 1 step + {a.batches} batches per policy and load")
    workers = {name: Worker(name, a.batches) for name in names}
    try:
        infos = {name: w.read()["info"] for name, w in workers.items()}
        for r in range(a.rounds):
            for phase in PHASES:
                procs = start_load(phase) if phase != "idle" else []
                try:
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        workers[name].measure(phase)
                finally:
                    stop_load(procs)
    finally:
        for w in workers.values():
            w.close()
    rows = [row for name, w in workers.items() for row in summarise(name, w.times)]
    others = {name: w.times["idle"]["others"] for name, w in workers.items()}

    print("\npolicy        threads  OpenMP  wait variables set         other processes' CPU in idle calls (cores)")
    for name, info in infos.items():
        env = ", ".join(f"{k}={v}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
                        if (v := info["env"][k]) is not None)
        busy = f"median {statistics.median(others[name]):.2f}, max {max(others[name]):.2f}" if others[name] else "n/a"
        print(f"{name:<14}{info['intra_op_threads']:>7}  {info['openmp_runtime'] or '?':<8}{env or '(none)':<27}{busy}")
    cell = {(r["policy"], r["workload"], r["load"]): r for r in rows}
    print(f"\n{'':<24}{'idle':>7}" + "".join(f"{ph:>14}" for ph in PHASES[1:]) + "   CPU s per call: "
          + " / ".join(PHASES))
    print(f"{'policy':<14}{'workload':<10}{'s':>7}" + f"{'s  x idle':>14}" * (len(PHASES) - 1))
    for name in names:
        for workload in ("pretrain", "extract"):
            rs = [cell[name, workload, ph] for ph in PHASES]
            print(f"{name:<14}{workload:<10}{rs[0]['wall']:>7.3f}"
                  + "".join(f"{r['wall']:>8.3f}{r['ratio']:>6.2f}" for r in rs[1:])
                  + "   " + " / ".join(f"{r['cpu']:.2f}" for r in rs))
    worst = max(r["ratio"] for r in rows if r["policy"] == "new-default" and r["load"] in CHECKED)
    ok = worst <= a.max_ratio
    print(f"\nnew-default worst loaded / idle under {' and '.join(CHECKED)} = {worst:.2f} (limit {a.max_ratio}): "
          f"{'PASS' if ok else 'FAIL'}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
