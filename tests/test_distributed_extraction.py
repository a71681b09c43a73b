"""Distributed feature extraction: a 2-process gloo run (launched with torchrun, as a user would) against one
process, on datasets whose sizes do not divide by 2.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node=2
tests/test_distributed_extraction.py OUT`` extracts on every rank and dumps what each rank got to ``OUT``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
N_ODD = 37  # not divisible by 2: shards of 18 and 19
BATCH = 8  # shards do not end on batch boundaries
BROKEN_INDEX = 30  # in rank 1's shard [18, 37)


def _digits(n: int):
    from prosmin_bench.data.base import ArrayImageDataset
    from prosmin_bench.data.bundled import load_digits_split

    d = load_digits_split("train")
    return ArrayImageDataset(d.images[:n], d.labels[:n], d.class_names, f"digits-first{n}")


def _broken(n: int):
    from prosmin_bench.data.base import ArrayImageDataset
    from prosmin_bench.errors import DataError

    class Broken(ArrayImageDataset):
        def get_image(self, index: int):
            if index == BROKEN_INDEX:
                raise DataError(f"image {index} is unreadable")
            return super().get_image(index)

    d = _digits(n)
    return Broken(d.images, d.labels, d.class_names, f"broken{n}")


def worker(out: Path) -> None:
    from prosmin_bench import distributed
    from prosmin_bench.features import extract
    from prosmin_bench.models import get_model

    # A crash inside torch's C++ (gloo) prints no Python traceback; these leave the test a trace of where it was:
    # faulthandler dumps every thread's Python stack on SIGABRT/SIGSEGV, and each step is logged as it starts.
    rank_env = os.environ["RANK"]
    fault_log = open(out / f"fault{rank_env}.txt", "w")
    faulthandler.enable(file=fault_log, all_threads=True)
    steps = open(out / f"steps{rank_env}.txt", "w", buffering=1)

    def step(name: str) -> None:
        steps.write(f"{time.monotonic():.3f} {name}\n")

    torch.set_num_threads(1)
    step("init")
    info = distributed.init_from_env("cpu", timeout_s=120)  # a hang fails the test instead of stalling it
    r = info.rank
    model = get_model("random_micro")
    report: dict = {"rank": r, "world": info.world_size, "backend": info.backend}
    cache = {"cache": True, "cache_root": out / "cache", "shard": True}
    step("odd")
    fs = extract(model, _digits(N_ODD), dataset_id="odd", batch_size=BATCH, **cache)
    np.save(out / f"odd{r}.npy", np.asarray(fs.features))
    np.save(out / f"odd_labels{r}.npy", np.asarray(fs.labels))
    report["odd_key"], report["odd_computed"], report["odd_meta"] = fs.key, fs.computed, fs.meta
    step("again")
    again = extract(model, _digits(N_ODD), dataset_id="odd", batch_size=BATCH, **cache)
    report["again_computed"] = again.computed
    step("one")
    one = extract(model, _digits(1), dataset_id="one", batch_size=BATCH, cache=False, shard=True)  # rank 0: empty
    np.save(out / f"one{r}.npy", np.asarray(one.features))
    step("broken")
    try:
        extract(model, _broken(N_ODD), dataset_id="broken", batch_size=BATCH, **cache)
        report["broken"] = None
    except Exception as exc:  # recorded for the test: every rank must fail, none may hang
        report["broken"] = [type(exc).__name__, str(exc)]
    # Unsharded (what a protocol running on rank 0 alone does): no collective, so no hang while rank 1 waits.
    step("alone")
    if r == 0:
        alone = extract(model, _digits(N_ODD), dataset_id="odd", batch_size=BATCH, cache_root=out / "cache_alone")
        np.save(out / "alone.npy", np.asarray(alone.features))
    step("barrier")
    distributed.barrier()
    # The runner under torchrun: every rank extracts, rank 0 alone runs the protocol and writes the record.
    from prosmin_bench.runner import RunOptions, evaluate

    step("evaluate")
    records = evaluate("random_micro", "digits_knn", options=RunOptions(
        seeds=(0,), device="cpu", results_dir=out / "results", pretrain_missing=False, batch_size=128))
    report["records"] = [[rec.task, type(rec).__name__, getattr(rec, "per_seed", None)] for rec in records]
    step("report")
    json.dump(report, open(out / f"report{r}.json", "w"), default=str)
    step("destroy")
    distributed.destroy()
    step("done")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _diagnosis(out: Path, proc: subprocess.CompletedProcess) -> str:
    """What each rank was doing when the job failed: its last steps and any faulthandler dump, then stderr."""
    parts = []
    for r in range(2):
        for name in (f"steps{r}.txt", f"fault{r}.txt"):
            f = out / name
            text = f.read_text() if f.is_file() else "(missing)"
            parts.append(f"--- rank {r} {name}:\n{text[:3000]}")  # a dump's thread stacks come first
    return "\n".join(parts) + f"\n--- stdout:\n{proc.stdout[-2000:]}\n--- stderr:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_extract")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PROSMIN_BENCH_HOME": str(out / "home")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__)), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, _diagnosis(out, proc)
    reports = [json.load(open(out / f"report{r}.json")) for r in range(2)]
    return out, reports


@pytest.fixture(scope="module")
def single():
    """The same extraction on one process (no process group), the reference."""
    from prosmin_bench.features import extract
    from prosmin_bench.models import get_model

    model = get_model("random_micro")
    odd = extract(model, _digits(N_ODD), dataset_id="odd", batch_size=BATCH, cache=False)
    one = extract(model, _digits(1), dataset_id="one", batch_size=BATCH, cache=False)
    return odd, one


def test_two_ranks_give_exactly_the_single_process_features_in_order(two_ranks, single):
    out, reports = two_ranks
    odd, _ = single
    assert [r["world"] for r in reports] == [2, 2] and reports[0]["backend"] == "gloo"
    ref = torch.from_numpy(np.asarray(odd.features))
    assert ref.shape[0] == N_ODD
    for r in range(2):
        got = torch.from_numpy(np.load(out / f"odd{r}.npy"))
        assert torch.equal(got, ref), f"rank {r}"
        assert np.array_equal(np.load(out / f"odd_labels{r}.npy"), np.asarray(odd.labels))
        assert reports[r]["odd_key"] == odd.key  # same content key as a single-process run
        assert reports[r]["odd_computed"] is True
        assert reports[r]["odd_meta"]["world_size"] == 2 and reports[r]["odd_meta"]["images_per_second"] > 0


def test_rank0_wrote_one_complete_cache_entry_that_every_rank_reuses(two_ranks, single):
    from prosmin_bench.features import load_cached

    out, reports = two_ranks
    odd, _ = single
    cached = load_cached(odd.key, out / "cache")
    assert cached is not None and isinstance(cached.features, np.memmap)
    assert torch.equal(torch.from_numpy(np.array(cached.features)), torch.from_numpy(np.asarray(odd.features)))
    assert np.array_equal(cached.labels, odd.labels)
    assert cached.meta["dtype"] == "float32" and cached.meta["precision"] == "fp32" and cached.meta["n"] == N_ODD
    files = sorted(p.name for p in (out / "cache").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp")], files  # the failed 'broken' extraction left nothing
    assert len(files) == 3, files  # features, labels, sidecar of the one successful entry
    assert [r["again_computed"] for r in reports] == [False, False]


def test_fewer_samples_than_ranks(two_ranks, single):
    out, _ = two_ranks
    _, one = single
    for r in range(2):
        assert torch.equal(torch.from_numpy(np.load(out / f"one{r}.npy")), torch.from_numpy(np.asarray(one.features)))


def test_unsharded_extraction_on_rank0_alone_does_not_wait_for_the_others(two_ranks, single):
    out, _ = two_ranks
    odd, _ = single
    assert torch.equal(torch.from_numpy(np.load(out / "alone.npy")), torch.from_numpy(np.asarray(odd.features)))


def test_a_failure_on_one_rank_fails_every_rank_without_hanging(two_ranks):
    _, reports = two_ranks
    assert reports[1]["broken"][0] == "DataError" and "unreadable" in reports[1]["broken"][1]
    assert reports[0]["broken"][0] == "FeatureError" and "rank 1" in reports[0]["broken"][1]


def test_runner_under_torchrun_rank0_alone_runs_the_protocol_and_writes(two_ranks, tmp_path):
    from prosmin_bench.runner import RunOptions, evaluate

    out, reports = two_ranks
    assert reports[1]["records"] == []  # rank 1 only extracted
    (task, kind, per_seed), = reports[0]["records"]
    assert (task, kind) == ("digits_knn", "ResultRecord")
    written = sorted(p.relative_to(out / "results").as_posix() for p in (out / "results").rglob("*.json"))
    assert written == ["random_micro/digits_knn.json"]
    (ref,) = evaluate("random_micro", "digits_knn", options=RunOptions(
        seeds=(0,), device="cpu", results_dir=tmp_path / "results", pretrain_missing=False, batch_size=128))
    assert per_seed == ref.per_seed  # the same features, hence exactly the same metrics


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
