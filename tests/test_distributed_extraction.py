"""Distributed feature extraction: a 2-process gloo run (launched with torchrun, as a user would) against one
process, on datasets whose sizes do not divide by 2; the runner's every preprocessing variant (the corruption task's
no-resize view) is extracted sharded too.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node=2
tests/test_distributed_extraction.py OUT`` extracts on every rank and dumps what each rank got to ``OUT``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
N_ODD = 37  # not divisible by 2: shards of 18 and 19
BATCH = 8  # shards do not end on batch boundaries
BROKEN_INDEX = 30  # in rank 1's shard [18, 37)
N_C = 5  # clean images that digits_c corrupts in the corruption run: shards of 2 and 3
N_TRAIN_C = 100  # training images of that run's linear head (every class is among them)
# The corruption task on a model whose preprocessing resizes (36 px, crop 32), with `resize = false`: its corrupted
# splits go through the no-resize view of the model. AlexNet's table as the baseline keeps the run to extraction.
CORRUPTION_CARDS = {
    "dx_linear.toml": """
        name = "dx_linear"
        kind = "linear"
        version = 1
        suite = "mini"
        main_score = "top1"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        [protocol]
        layer = "cls"
        epochs = 2
        base_lrs = [0.1]
        batch_size = 64
    """,
    "dx_aug.toml": """
        name = "dx_aug"
        kind = "linear_aug"
        version = 1
        suite = "mini"
        main_score = "top1"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        [protocol]
        epochs = 1
        base_lrs = [0.1]
        batch_size = 64
        crop_scale = [0.6, 1.0]
        hflip = false
    """,
    "dx_c.toml": """
        name = "dx_c"
        kind = "corruption"
        version = 1
        suite = "mini"
        main_score = "mce"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        [protocol]
        corrupted = "digits_c"
        head_task = "dx_linear"
        baseline = "alexnet"
        resize = false
    """,
}


def _resizing_model():
    from prosmin_bench.models import ModelSpec, Preprocess, WeightsSource

    return ModelSpec(name="tiny_resize", arch="vit_micro", weights=WeightsSource(random=True, seed=0),
                     preprocess=Preprocess(resize=36, crop=32), scale="mini", method="random")


def _small_digits(setattr_: Callable[[object, str, object], None]) -> Callable[[], None]:
    """digits:test and digits_c's base become the first N_C test images, digits:train its first N_TRAIN_C images;
    ``setattr_`` patches digits_c's base (monkeypatch.setattr in a test). Returns the undo for the registry."""
    import dataclasses

    from prosmin_bench.data import DATASETS, corruptions
    from prosmin_bench.data.base import ArrayImageDataset
    from prosmin_bench.data.bundled import load_digits_split

    def first(split: str, n: int):
        d = load_digits_split(split)
        return ArrayImageDataset(d.images[:n], d.labels[:n], d.class_names, f"{d.fingerprint}-first{n}")

    small = {"test": first("test", N_C), "train": first("train", N_TRAIN_C)}
    setattr_(corruptions, "digits_c_base", lambda: small["test"])
    spec = DATASETS.get("digits")
    DATASETS.add("digits", dataclasses.replace(spec, loader=lambda split, root=None: small[split]), replace=True)
    return lambda: DATASETS.add("digits", spec, replace=True)


def _generate_digits_c(home: Path) -> None:
    """The 75 digits_c splits of the small test set, generated once into ``home``'s data cache (seeded, so every
    process that copies them reads what it would have generated)."""
    from prosmin_bench.data import resolve_dataset
    from prosmin_bench.metrics import CORRUPTIONS

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROSMIN_BENCH_HOME", str(home))
        undo = _small_digits(mp.setattr)
        try:
            for c in CORRUPTIONS:
                for s in range(1, 6):
                    resolve_dataset(f"digits_c:{c}/{s}")
        finally:
            undo()


def _count_view_rows(report: dict) -> None:
    """Record in ``report`` each preprocessing view of a model this process makes and the rows it extracts."""
    from prosmin_bench.models.backbone import Backbone

    make = Backbone.with_preprocess
    report["view_resize"], report["view_rows"] = [], 0

    def counting(self, preprocess):
        view = make(self, preprocess)
        report["view_resize"].append(preprocess.resize)
        forward = view.features

        def features(images, layer="cls"):
            report["view_rows"] += len(images)
            return forward(images, layer)

        view.features = features
        return view

    Backbone.with_preprocess = counting


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
    # The augmented linear probe: rank 0 leads each training pass, rank 1 follows it in the runner's serve loop.
    step("linear_aug")
    from prosmin_bench import cards

    cards.add_card_dir(out / "cards")
    records = evaluate("random_micro", "dx_aug", options=RunOptions(
        seeds=(0,), device="cpu", results_dir=out / "results_aug", pretrain_missing=False, batch_size=128))
    report["linear_aug"] = [[rec.task, type(rec).__name__, getattr(rec, "per_seed", getattr(rec, "message", None))]
                            for rec in records]
    # The corruption task: its no-resize view of the model, a preprocessing variant, is extracted by every rank.
    step("corruption")
    _count_view_rows(report)
    _small_digits(setattr)
    cards.add_card_dir(out / "cards")
    records = evaluate([_resizing_model()], ["dx_c"], options=RunOptions(
        seeds=(0,), device="cpu", results_dir=out / "results_c", pretrain_missing=False, batch_size=BATCH))
    report["corruption"] = [[rec.task, type(rec).__name__, getattr(rec, "per_seed", getattr(rec, "message", None))]
                            for rec in records]
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
    (out / "cards").mkdir()
    for name, text in CORRUPTION_CARDS.items():
        (out / "cards" / name).write_text(textwrap.dedent(text))
    _generate_digits_c(out / "home")
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


def test_linear_aug_under_torchrun_trains_on_both_ranks_and_equals_one_process(two_ranks, tmp_path):
    from prosmin_bench import cards
    from prosmin_bench.runner import RunOptions, evaluate

    out, reports = two_ranks
    assert reports[1]["linear_aug"] == []  # rank 1 only followed (extraction and the DDP training passes)
    (task, kind, per_seed), = reports[0]["linear_aug"]
    assert (task, kind) == ("dx_aug", "ResultRecord"), per_seed
    try:
        cards.add_card_dir(out / "cards")
        (ref,) = evaluate("random_micro", "dx_aug", options=RunOptions(
            seeds=(0,), device="cpu", results_dir=tmp_path / "results", pretrain_missing=False, batch_size=128))
    finally:
        cards.clear_card_dirs()
    # The same per-image augmentations and the same global batches, except that DistributedSampler pads the odd
    # number of training images (1,293 fit / 1,437 all) with a repeat of the first, as DINO's does: close, not equal
    # (an idle follower would hang, a wrong lr scaling or unsynchronised heads would move these far more).
    got, want = per_seed["0"], ref.per_seed["0"]
    assert got["lr"] == want["lr"]
    assert abs(got["nll"] - want["nll"]) < 0.05 and abs(got["top1"] - want["top1"]) <= 4 / 360


def test_corruption_view_is_extracted_by_every_rank_and_equals_one_process(two_ranks, monkeypatch, tmp_path):
    import dataclasses

    from prosmin_bench import cards, config
    from prosmin_bench.data import dataset_key, resolve_dataset
    from prosmin_bench.features import cache_key, load_cached
    from prosmin_bench.models import get_model
    from prosmin_bench.results import ResultRecord
    from prosmin_bench.runner import RunOptions, evaluate

    out, reports = two_ranks
    (task, kind, per_seed), = reports[0]["corruption"]
    assert (task, kind) == ("dx_c", "ResultRecord"), per_seed
    assert reports[1]["corruption"] == []  # rank 1 only extracted
    # Each rank made the no-resize view once and ran it on its own shard of each of the 75 corrupted splits.
    assert [r["view_resize"] for r in reports] == [[None], [None]]
    assert sorted(r["view_rows"] for r in reports) == [75 * (N_C // 2), 75 * (N_C - N_C // 2)]
    # One process computes the same record and the same features (content-keyed: the same cache entries).
    shutil.copytree(out / "home" / "data", config.data_cache_dir())  # the same corrupted images, not generated again
    undo = _small_digits(monkeypatch.setattr)
    try:
        cards.add_card_dir(out / "cards")
        (rec,) = evaluate([_resizing_model()], ["dx_c"], options=RunOptions(
            seeds=(0,), device="cpu", results_dir=tmp_path / "results", pretrain_missing=False, batch_size=BATCH))
        assert isinstance(rec, ResultRecord)
        assert json.dumps(rec.per_seed, sort_keys=True) == json.dumps(per_seed, sort_keys=True)  # NaN-safe, exact
        model = get_model(_resizing_model())
        view = model.with_preprocess(dataclasses.replace(model.spec.preprocess, resize=None))
        for ref in ("digits_c:fog/3", "digits_c:gaussian_noise/1", "digits_c:jpeg_compression/5"):
            key = cache_key(view, dataset_key(ref), resolve_dataset(ref).fingerprint, "cls", "fp32", "float32")
            two, one = load_cached(key, out / "home" / "features"), load_cached(key)
            assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1, ref
            assert torch.equal(torch.from_numpy(np.array(two.features)), torch.from_numpy(np.array(one.features)))
            assert np.array_equal(two.labels, one.labels)
    finally:
        undo()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
