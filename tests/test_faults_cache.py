"""Fault suite, feature cache (issue 15): a cached feature set is reused only when everything that determines it
matches, an entry edited since it was written is recomputed, and a full disk or an interruption leaves no
temporary file behind.

Driven through the command line like tests/test_faults.py: each test asserts the exit code, the one line a user
sees and the state of the cache folder afterwards. The image folders hold BMP files, whose size depends only on
the image size, so an image can be replaced by a different one of exactly the same byte size.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prosmin_bench import config
from prosmin_bench.data.base import ArrayImageDataset, FileImageDataset
from prosmin_bench.data.bundled import load_digits_split
from prosmin_bench.features import FeatureSet, load_cached, store
from prosmin_bench.paths import record_path
from prosmin_bench.results import ErrorRecord, ResultRecord, read_record
from test_faults import assert_run_error, cards_dir, cli, no_forward  # noqa: F401  (fixtures)

N_TRAIN, N_TEST = 6, 3  # per class

# The same datasets and layer as toy_knn (tests/test_faults.py), so it reuses toy_knn's cached features.
TOY_KNN3 = """
    name = "toy_knn3"
    kind = "knn"
    version = 1
    suite = "mini"
    main_score = "top1_k3"
    [datasets]
    train = { source = "imagefolder", root = "toy/train" }
    test = { source = "imagefolder", root = "toy/test" }
    [protocol]
    ks = [3]
"""


def write_images(root: Path, split: str, n: int, bright: str, seed: int) -> None:
    """``root/toy/<split>/{a,b}/<i>.bmp``, 32 px: class ``bright`` light, the other dark."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        lo, hi = (128, 256) if c == bright else (0, 128)
        d = root / "toy" / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(lo, hi, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.bmp")


def make_bmp_toy(root: Path) -> Path:
    write_images(root, "train", N_TRAIN, bright="b", seed=0)
    write_images(root, "test", N_TEST, bright="b", seed=1)
    return root


def run_toy(capsys, cards: Path, data: Path, res: Path, *extra: str, task: str = "toy_knn") -> tuple[int, str]:
    code, _, err = cli(capsys, "-q", "--cards", str(cards), "run", "--model", "random_micro", "--task", task,
                       "--data-root", str(data), "--num-workers", "0", "--results", str(res), *extra)
    return code, err


def score(res: Path, task: str = "toy_knn") -> float:
    rec = read_record(record_path(res, "random_micro", task))
    assert isinstance(rec, ResultRecord), rec
    return rec.main_value


def entries() -> dict[str, dict]:
    """Committed feature cache entries: key -> sidecar."""
    d = config.features_dir()
    return {p.name[: -len(".json")]: json.loads(p.read_text()) for p in sorted(d.rglob("*.json"))} if d.exists() else {}


def leftovers() -> list[Path]:
    """Files under the feature cache that belong to no committed entry (temporary or orphaned halves)."""
    d, keys = config.features_dir(), set(entries())
    files = [p for p in d.rglob("*") if p.is_file()] if d.exists() else []
    return [p for p in files if p.name.split(".")[0] not in keys or p.name.endswith(".tmp")]


def entry_of(split: str) -> tuple[str, dict]:
    (key, meta), = [(k, m) for k, m in entries().items() if f"root=toy/{split}" in m["dataset"]]
    return key, meta


# ---------------------------------------------------------------------------------------------------------------
# 1. Stale features: images replaced by others of the same size, another copy of the data root, --data-hash.


def test_images_replaced_by_same_size_files_are_extracted_again(tmp_path, cards_dir, capsys, no_forward):
    data = make_bmp_toy(tmp_path / "data")
    assert run_toy(capsys, cards_dir, data, tmp_path / "res1")[0] == 0
    assert score(tmp_path / "res1") == 1.0 and len(entries()) == 2
    test_files = sorted((data / "toy" / "test").rglob("*.bmp"))
    before = {p: os.stat(p) for p in test_files}
    write_images(data, "test", N_TEST, bright="a", seed=2)  # other pixels, the classes' brightness swapped
    for p, st in before.items():
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a copy a second later would leave it
        assert os.stat(p).st_size == st.st_size
    no_forward.clear()
    code, err = run_toy(capsys, cards_dir, data, tmp_path / "res2")  # a fresh results folder: no record to reuse
    assert code == 0, err
    assert sum(no_forward) == len(test_files)  # the test images went through the backbone again, the train ones not
    assert score(tmp_path / "res2") == 0.0 and len(entries()) == 3 and leftovers() == []


def test_another_copy_of_the_data_root_is_another_dataset_and_a_symlink_is_the_same(tmp_path, cards_dir, capsys,
                                                                                     no_forward):
    data = make_bmp_toy(tmp_path / "data")
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)  # the same relative paths, sizes and (copy2) mtimes
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    assert run_toy(capsys, cards_dir, data, tmp_path / "res1")[0] == 0
    first = entries()
    no_forward.clear()
    assert run_toy(capsys, cards_dir, tmp_path / "link", tmp_path / "res2")[0] == 0
    assert no_forward == [] and entries() == first  # through a symlink: the same folder, the same features
    assert run_toy(capsys, cards_dir, copy, tmp_path / "res3")[0] == 0
    assert sum(no_forward) == 2 * (N_TRAIN + N_TEST) and len(entries()) == 4
    fingerprints = {m["fingerprint"] for m in entries().values()}
    assert len(fingerprints) == 4 and {m["data_hash"] for m in entries().values()} == {"stat"}


def test_data_hash_content_sees_an_edit_that_keeps_size_and_mtime(tmp_path, cards_dir, capsys, no_forward):
    data = make_bmp_toy(tmp_path / "data")
    assert run_toy(capsys, cards_dir, data, tmp_path / "stat1")[0] == 0
    assert run_toy(capsys, cards_dir, data, tmp_path / "content1", "--data-hash", "content")[0] == 0
    assert sorted(m["data_hash"] for m in entries().values()) == ["content", "content", "stat", "stat"]
    test_files = sorted((data / "toy" / "test").rglob("*.bmp"))
    before = {p: os.stat(p) for p in test_files}
    write_images(data, "test", N_TEST, bright="a", seed=2)
    for p, st in before.items():  # the edit a stat fingerprint cannot see: same size, mtime put back
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    no_forward.clear()
    assert run_toy(capsys, cards_dir, data, tmp_path / "stat2")[0] == 0
    assert no_forward == [] and score(tmp_path / "stat2") == 1.0  # the documented limit of the default
    code, err = run_toy(capsys, cards_dir, data, tmp_path / "content2", "--data-hash", "content")
    assert code == 0, err
    assert sum(no_forward) == len(test_files) and score(tmp_path / "content2") == 0.0


def test_in_memory_datasets_are_fingerprinted_by_their_pixels_and_labels():
    digits = load_digits_split("test")
    again = ArrayImageDataset(digits.images.copy(), digits.labels, digits.class_names, "digits-v1-test")
    assert again.fingerprint == digits.fingerprint and digits.fingerprint.startswith("digits-v1-test-")
    pixels = digits.images.copy()
    pixels[0, 0, 0, 0] ^= 1
    labels = digits.labels.copy()
    labels[0] = (labels[0] + 1) % 10
    for images, y in ((pixels, digits.labels), (digits.images, labels)):
        other = ArrayImageDataset(images, y, digits.class_names, "digits-v1-test")
        assert other.fingerprint != digits.fingerprint
        assert other.fingerprint_for("content") == other.fingerprint_for("stat") == other.fingerprint


def test_file_dataset_fingerprint_follows_size_mtime_and_resolved_root(tmp_path):
    data = make_bmp_toy(tmp_path / "data")
    paths = sorted(str(p) for p in (data / "toy" / "train").rglob("*.bmp"))

    def fingerprint(root: Path) -> str:
        return FileImageDataset([str(root / os.path.relpath(p, data)) for p in paths], [0] * len(paths), ["x"],
                                root=root).fingerprint

    base = fingerprint(data)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    assert fingerprint(tmp_path / "link") == base
    shutil.copytree(data, tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") != base
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fingerprint(data) != base


# ---------------------------------------------------------------------------------------------------------------
# 2. Cached labels or features edited in place (same size): the checksum in the sidecar no longer matches.


def _flip_labels(path: Path) -> None:
    labels = np.lib.format.open_memmap(path, mode="r+")
    labels[:] = 1 - labels
    labels.flush()


def _negate_features(path: Path) -> None:
    feats = np.lib.format.open_memmap(path, mode="r+")
    feats[:] = -feats
    feats.flush()


@pytest.mark.parametrize("edit, what, suffix", [(_flip_labels, "labels", ".labels.npy"),
                                                (_negate_features, "features", ".npy")], ids=["labels", "features"])
def test_cache_entry_edited_in_place_is_recomputed(tmp_path, cards_dir, capsys, no_forward, edit, what, suffix):
    data = make_bmp_toy(tmp_path / "data")
    assert run_toy(capsys, cards_dir, data, tmp_path / "res1")[0] == 0
    key, meta = entry_of("train")
    path = config.features_dir() / key[:2] / f"{key}{suffix}"
    original, size = np.load(path).copy(), path.stat().st_size
    edit(path)
    assert path.stat().st_size == size and not np.array_equal(np.load(path), original)
    no_forward.clear()
    code, err = run_toy(capsys, cards_dir, data, tmp_path / "res2")
    assert code == 0, err
    assert (f"feature cache entry {key[:12]} ({config.features_dir() / key[:2] / key}.npy) does not match its "
            f"checksum: its {what} changed since it was written; it will be recomputed") in err
    assert sum(no_forward) == 2 * N_TRAIN  # the train set again, the test set from the cache
    assert score(tmp_path / "res2") == score(tmp_path / "res1") == 1.0
    assert np.array_equal(np.load(path), original) and leftovers() == []


# ---------------------------------------------------------------------------------------------------------------
# NaN features in the cache (an entry written by a version that did not check): the error names the entry, and
# --overwrite recomputes the entries the run uses, not only the records.


def test_nan_features_in_the_cache_name_the_entry_and_overwrite_recomputes_it(tmp_path, cards_dir, capsys,
                                                                              no_forward):
    (cards_dir / "toy_knn3.toml").write_text(textwrap.dedent(TOY_KNN3))
    data, res = make_bmp_toy(tmp_path / "data"), tmp_path / "res"
    assert run_toy(capsys, cards_dir, data, res)[0] == 0
    key, meta = entry_of("train")
    hit = load_cached(key)
    feats = np.array(hit.features)
    feats[[2, 4]] = np.nan
    store(FeatureSet(feats, hit.labels, key, meta))  # checksums and NaN count taken anew, as another writer would
    fpath = config.features_dir() / key[:2] / f"{key}.npy"
    code, err = run_toy(capsys, cards_dir, data, res, task="toy_knn3")
    assert_run_error(code, err, "random_micro / toy_knn3",
                     f"Cached features {str(fpath)!r} (random_micro root=toy/train,source=imagefolder) contain NaN "
                     f"or inf in 2 rows (first row 2); delete {str(fpath.with_suffix(''))}.* or run again with "
                     "--overwrite to recompute them")
    rec = read_record(record_path(res, "random_micro", "toy_knn3"))
    assert isinstance(rec, ErrorRecord) and rec.error_type == "FeatureError"
    no_forward.clear()
    code, err = run_toy(capsys, cards_dir, data, res, "--overwrite", task="toy_knn3")
    assert code == 0, err
    assert sum(no_forward) == 2 * (N_TRAIN + N_TEST)  # every entry the run uses, recomputed once
    assert np.isfinite(load_cached(key).features).all() and score(res, "toy_knn3") == 1.0
    assert leftovers() == []


# ---------------------------------------------------------------------------------------------------------------
# 10. A full cache disk: refused before the extraction writes, with the size and the folder; no temp file kept.


def _free_space_too_small(monkeypatch) -> None:
    real = shutil.disk_usage

    def usage(path):
        got = real(path)
        if str(path).startswith(str(config.features_dir())):
            return type(got)(got.total, got.total - 1000, 1000)
        return got

    monkeypatch.setattr(shutil, "disk_usage", usage)


def _allocation_fails(monkeypatch) -> None:
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)


@pytest.mark.parametrize("make_full", [_free_space_too_small, _allocation_fails], ids=["free-space", "fallocate"])
def test_full_cache_disk_is_one_line_and_leaves_no_temp_file(tmp_path, cards_dir, capsys, monkeypatch, make_full):
    data, res = make_bmp_toy(tmp_path / "data"), tmp_path / "res"
    with monkeypatch.context() as mp:
        make_full(mp)
        code, err = run_toy(capsys, cards_dir, data, res)
    assert_run_error(code, err, "random_micro / toy_knn", "Feature cache entry ",
                     f"free in {str(config.features_dir())!r}, but only ",
                     "free space or set PROSMIN_BENCH_HOME to a folder on a larger disk (the feature cache is "
                     "$PROSMIN_BENCH_HOME/features)")
    rec = read_record(record_path(res, "random_micro", "toy_knn"))
    assert isinstance(rec, ErrorRecord) and rec.error_type == "FeatureError" and " needs " in rec.message
    assert entries() == {} and leftovers() == []
    assert run_toy(capsys, cards_dir, data, res)[0] == 0  # space freed: the run finishes
    assert len(entries()) == 2 and leftovers() == []


# ---------------------------------------------------------------------------------------------------------------
# An interrupted extraction (Ctrl-C, or SIGTERM which the CLI turns into the same exception) removes its temp files.


def _interrupt_mid_extraction(monkeypatch) -> None:
    real, calls = FileImageDataset.get_image, []

    def get_image(self, index):
        calls.append(index)
        if len(calls) == 9:  # two batches of 4 are already in the temporary memmap
            raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(FileImageDataset, "get_image", get_image)


def _interrupt_at_commit(monkeypatch) -> None:
    import prosmin_bench.feature_cache as feature_cache

    def write_json(path, obj):  # the features are renamed into place and the labels written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_cache, "_write_sidecar", write_json)


@pytest.mark.parametrize("interrupt", [_interrupt_mid_extraction, _interrupt_at_commit], ids=["mid-batch", "commit"])
def test_interrupted_extraction_leaves_no_temp_file(tmp_path, cards_dir, capsys, monkeypatch, interrupt):
    data, res = make_bmp_toy(tmp_path / "data"), tmp_path / "res"
    with monkeypatch.context() as mp:
        interrupt(mp)
        code, err = run_toy(capsys, cards_dir, data, res, "--batch-size", "4")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert entries() == {} and leftovers() == []
    assert not record_path(res, "random_micro", "toy_knn").exists()
    assert run_toy(capsys, cards_dir, data, res, "--batch-size", "4")[0] == 0
    assert len(entries()) == 2 and leftovers() == []
