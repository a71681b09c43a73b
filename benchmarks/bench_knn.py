"""Benchmark: streaming ``knn_predict`` against a plain dense k-NN, and on a 1.28M-row bank under a memory budget.

Two measurements, each run in a fresh subprocess so its peak resident memory is its own (the peak RSS counter is
reset after the inputs are loaded; the growth above that level is what the call itself allocated):

1. ``fits``: 50k x 384 float32 train bank, 10k queries, 1000 classes, in RAM. The dense reference materialises the
   [10k, 50k] similarity matrix (2 GB), takes its top-k and votes; ``knn_predict`` streams it with the default
   1 GiB budget. Prints seconds, peak RSS growth, similarities per second, the speed ratio dense / streaming and
   the largest probability difference and how many queries differ (each must be an exact tie at the k-th
   neighbour, which the two methods may break differently).
2. ``big``: a 1.28M x 384 float16 bank (ImageNet-train size at ViT-S width, 983 MB), generated chunk by chunk
   into a ``.npy`` memmap under ``--workdir`` (kept for later runs), and 10k queries; ``knn_predict`` with
   ``--max-memory`` (default 256M, a quarter of the bank). Prints seconds, peak RSS growth against the budget,
   similarities per second (compare with 1.) and the chunk plan. A dense run would need a 51 GB matrix.

Run: ``python benchmarks/bench_knn.py [--threads 1] [--k 20] [--max-memory 256M] [--repeats 3]
[--workdir /tmp/prosmin-bench-knn] [--skip-big]``. Exits non-zero if a peak exceeds its budget or the two methods
disagree on a query without a tie at its k-th neighbour.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 384  # ViT-S/16 width
N_QUERIES = 10_000
N_CLASSES = 1000  # ImageNet
FITS_TRAIN = 50_000  # the issue-2 size: the dense matrix (2 GB) fits
BIG_TRAIN = 1_281_167  # ImageNet-1k train images
GEN_ROWS = 65_536  # rows generated per step: generation itself stays bounded (~100 MB)
TEMPERATURE = 0.07  # DINO eval_knn.py


def _parse_memory(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b").rstrip("i")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset this process's peak RSS (VmHWM) to its current RSS


def generate(workdir: Path, n_train: int, dtype: str, seed: int) -> None:
    """Class-clustered features (so the vote means something), written chunk by chunk; queries likewise."""
    workdir.mkdir(parents=True, exist_ok=True)
    bank_path = workdir / f"bank_{n_train}_{dtype}.npy"
    if bank_path.is_file() and np.load(bank_path, mmap_mode="r").shape == (n_train, DIM):
        return
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CLASSES, DIM), dtype=np.float32)
    tmp = bank_path.with_suffix(".tmp.npy")
    bank = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n_train, DIM))
    labels = np.empty(n_train, dtype=np.int64)
    for s in range(0, n_train, GEN_ROWS):
        e = min(s + GEN_ROWS, n_train)
        y = rng.integers(0, N_CLASSES, e - s)
        bank[s:e] = centres[y] + 2.0 * rng.standard_normal((e - s, DIM), dtype=np.float32)
        labels[s:e] = y
    bank.flush()
    del bank
    yq = rng.integers(0, N_CLASSES, N_QUERIES)
    queries = centres[yq] + 2.0 * rng.standard_normal((N_QUERIES, DIM), dtype=np.float32)
    np.save(workdir / f"labels_{n_train}.npy", labels)
    np.save(workdir / f"queries_{n_train}.npy", queries.astype(np.float32))
    os.replace(tmp, bank_path)


def dense_reference(train, labels, test, k: int, temperature: float, num_classes: int):
    """Plain dense DINO k-NN: the whole [N_test, N_train] similarity matrix, one top-k, one vote."""
    import torch
    import torch.nn.functional as F

    sims = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    s, i = sims.topk(k, dim=1)
    del sims
    votes = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, labels[i], (s.double() / temperature).exp())
    return (votes / votes.sum(1, keepdim=True)).float()


def measure(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process: load inputs, warm up, reset the peak, run, report."""
    import torch

    from prosmin_bench.tasks.knn import _RESULT_BYTES_PER_K, _chunk_sizes, _working_bytes, knn_predict

    torch.set_num_threads(args.threads)
    wd = Path(args.workdir)
    n_train = FITS_TRAIN if args.measure.startswith("fits") else BIG_TRAIN
    dtype = "float32" if args.measure.startswith("fits") else "float16"
    bank = np.load(wd / f"bank_{n_train}_{dtype}.npy", mmap_mode="r")
    labels = torch.from_numpy(np.load(wd / f"labels_{n_train}.npy"))
    queries = torch.from_numpy(np.load(wd / f"queries_{n_train}.npy"))
    if args.measure.startswith("fits"):
        bank = torch.from_numpy(np.array(bank))  # in RAM, like the dense reference needs
    budget = args.max_memory if args.measure == "big" else 1 << 30
    # warm-up on a sliver: thread pools and kernels are set up outside the measurement
    knn_predict(bank[:4096], labels[:4096], queries[:64], k=args.k, num_classes=N_CLASSES)
    dense_reference(torch.as_tensor(np.asarray(bank[:4096], dtype=np.float32)), labels[:4096], queries[:64], args.k,
                    TEMPERATURE, N_CLASSES)
    _reset_peak()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    if args.measure == "fits_dense":
        probs = dense_reference(bank, labels, queries, args.k, TEMPERATURE, N_CLASSES)
    else:
        probs = knn_predict(bank, labels, queries, k=args.k, temperature=TEMPERATURE, num_classes=N_CLASSES,
                            max_memory=budget)
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - base) * 1024
    np.save(wd / f"probs_{args.measure}.npy", probs.numpy())
    itemsize = 4 if dtype == "float32" else 2
    n_rest = budget - _RESULT_BYTES_PER_K * args.k * N_QUERIES - 4 * N_QUERIES * N_CLASSES
    plan = _chunk_sizes(N_QUERIES, n_train, args.k, n_rest, itemsize, dim=DIM)
    return {"seconds": seconds, "peak_bytes": peak, "budget": budget, "plan": plan, "n_train": n_train,
            "planned_bytes": _working_bytes(*plan, DIM, args.k, itemsize)}


def _rows_without_boundary_tie(wd: Path, rows: np.ndarray, k: int) -> list[int]:
    """Queries among ``rows`` whose k-th and (k+1)-th dense similarities are not tied (within float32 rounding):
    only those would be a real disagreement, since a tie may be broken either way."""
    import torch
    import torch.nn.functional as F

    if len(rows) == 0:
        return []
    bank = torch.from_numpy(np.load(wd / f"bank_{FITS_TRAIN}_float32.npy"))
    queries = torch.from_numpy(np.load(wd / f"queries_{FITS_TRAIN}.npy"))[torch.from_numpy(rows)]
    top = (F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T).topk(k + 1, dim=1).values
    return [int(r) for r, t in zip(rows, top) if float(t[k - 1] - t[k]) > 1e-6]


def _run(what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--measure", what, "--threads", str(args.threads), "--k", str(args.k),
           "--max-memory", str(args.max_memory), "--workdir", str(args.workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"measurement {what!r} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: default 1)")
    ap.add_argument("--k", type=int, default=20, help="neighbours (DINO's main k)")
    ap.add_argument("--max-memory", type=_parse_memory, default=_parse_memory("256M"),
                    help="budget for the 1.28M-row run (default 256M)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prosmin-bench-knn"), help="where the banks are kept")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each 50k measurement (best is reported)")
    ap.add_argument("--skip-big", action="store_true", help="only the 50k comparison")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    mib = 2**20
    t = time.perf_counter()
    generate(args.workdir, FITS_TRAIN, "float32", seed=0)
    print(f"k = {args.k}, T = {TEMPERATURE}, D = {DIM}, {N_QUERIES} queries, {N_CLASSES} classes, "
          f"{args.threads} thread(s); data in {args.workdir} ({time.perf_counter() - t:.1f} s to prepare)")
    ok = True
    runs: dict[str, list[dict]] = {"fits_dense": [], "fits": []}
    for _ in range(args.repeats):  # alternated, best of n: the machine is shared, and load comes and goes
        for what in runs:
            runs[what].append(_run(what, args))
    dense, stream = (min(runs[w], key=lambda r: r["seconds"]) for w in ("fits_dense", "fits"))
    wd = args.workdir
    p_dense, p_stream = np.load(wd / "probs_fits_dense.npy"), np.load(wd / "probs_fits.npy")
    diff = float(np.abs(p_dense - p_stream).max())
    agree = float((p_dense.argmax(1) == p_stream.argmax(1)).mean())
    differing = np.unique(np.nonzero(np.abs(p_dense - p_stream) > 1e-5)[0])
    untied = _rows_without_boundary_tie(wd, differing, args.k)
    n_sims = FITS_TRAIN * N_QUERIES
    print(f"\n1. {FITS_TRAIN} x {DIM} float32 train bank in RAM, {N_QUERIES} queries (best of {args.repeats})")
    print(f"{'method':<34}{'seconds':>9}{'peak RSS MiB':>14}{'Msims/s':>10}")
    print(f"{'dense reference (full matrix)':<34}{dense['seconds']:>9.2f}{dense['peak_bytes'] / mib:>14.1f}"
          f"{n_sims / dense['seconds'] / 1e6:>10.1f}")
    print(f"{'knn_predict (budget 1 GiB)':<34}{stream['seconds']:>9.2f}{stream['peak_bytes'] / mib:>14.1f}"
          f"{n_sims / stream['seconds'] / 1e6:>10.1f}")
    print(f"speed ratio dense / knn_predict time: {dense['seconds'] / stream['seconds']:.2f}; peak memory ratio "
          f"knn_predict / dense: {stream['peak_bytes'] / dense['peak_bytes']:.2f}; max |prob difference| {diff:.2e}; "
          f"argmax agreement {agree:.4f}")
    print(f"{len(differing)} of {N_QUERIES} queries differ by > 1e-5; {len(differing) - len(untied)} of them have an "
          f"exact tie at the k-th neighbour (either tied train sample is a correct k-th neighbour)")
    ok &= not untied and stream["peak_bytes"] <= stream["budget"]
    if not args.skip_big:
        t = time.perf_counter()
        generate(args.workdir, BIG_TRAIN, "float16", seed=1)
        gen_seconds = time.perf_counter() - t
        big = _run("big", args)
        size = BIG_TRAIN * DIM * 2
        q, b = big["plan"]
        print(f"\n2. {BIG_TRAIN} x {DIM} float16 bank as a .npy memmap ({size / mib:.0f} MiB on disk), {N_QUERIES} "
              f"queries (bank ready in {gen_seconds:.0f} s)")
        print(f"knn_predict, --max-memory {big['budget'] / mib:.0f} MiB: {big['seconds']:.1f} s, peak RSS growth "
              f"{big['peak_bytes'] / mib:.1f} MiB ({100 * big['peak_bytes'] / big['budget']:.0f}% of the budget), "
              f"{BIG_TRAIN * N_QUERIES / big['seconds'] / 1e6:.1f} Msims/s "
              f"({BIG_TRAIN * N_QUERIES / big['seconds'] / (n_sims / stream['seconds']):.2f}x the 50k streaming "
              f"rate, {BIG_TRAIN * N_QUERIES / big['seconds'] / (n_sims / dense['seconds']):.2f}x the dense rate)")
        print(f"plan: {q} queries x {b} bank rows per block, {-(-N_QUERIES // q)} pass(es) over the bank; "
              f"dense would need a {N_QUERIES * BIG_TRAIN * 4 / 2**30:.0f} GiB similarity matrix")
        ok &= big["peak_bytes"] <= big["budget"]
    if not ok:
        raise SystemExit("FAILED: a peak exceeded its budget or the methods disagree")


if __name__ == "__main__":
    main()
