"""The HF source reads splits by the ``datasets`` data-files conventions and refuses a split the data does not have
(issue 22): asking for ``validation`` in a folder of train and test parquet once returned train + test.

Every folder here is written with ``datasets`` itself; loaded images and labels are compared with what was written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prosmin_bench.data import resolve_dataset
from prosmin_bench.errors import DataError

datasets = pytest.importorskip("datasets")

NAMES = ["x", "y", "z"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """The `datasets` cache in this test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


def rows(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """``n`` random 8x8 RGB images [n, 8, 8, 3] and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, len(NAMES), n).tolist()


def write_parquet(path: Path, images: np.ndarray, labels: list[int]) -> None:
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images], "label": labels}, features=feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def load(path: str, split: str, root: Path):
    return resolve_dataset({"source": "hf", "path": path, "split": split}, data_root=root)


def assert_rows(ds, images: np.ndarray, labels: list[int]) -> None:
    assert ds.labels.tolist() == labels and ds.class_names == NAMES
    got = np.stack([np.asarray(ds.get_image(i)) for i in range(len(ds))])
    np.testing.assert_array_equal(got, images)  # PNG in parquet is lossless


def test_offline_mode_holds():
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE


def test_parquet_hub_layout_refuses_validation_and_reads_train_exactly(tmp_path):
    train, test = rows(5, 0), rows(3, 1)
    write_parquet(tmp_path / "toy" / "data" / "train-00000-of-00001.parquet", *train)
    write_parquet(tmp_path / "toy" / "data" / "test-00000-of-00001.parquet", *test)
    with pytest.raises(DataError) as err:
        load("toy", "validation", tmp_path)
    msg = str(err.value)
    assert "has no split 'validation'" in msg and "its splits are ['train', 'test']" in msg
    assert 'Set split = "train"' in msg and "docs/cards.md" in msg and "\n" not in msg
    assert_rows(load("toy", "train", tmp_path), *train)
    assert_rows(load("toy", "test", tmp_path), *test)


def test_split_is_not_a_substring_match(tmp_path):
    """``test`` is in ``latest_train.parquet``; datasets names that file's split ``train``."""
    train, test = rows(4, 2), rows(2, 3)
    write_parquet(tmp_path / "toy" / "latest_train.parquet", *train)
    write_parquet(tmp_path / "toy" / "test.parquet", *test)
    assert_rows(load("toy", "test", tmp_path), *test)
    assert_rows(load("toy", "train", tmp_path), *train)


def test_single_unnamed_file_is_train(tmp_path):
    images, labels = rows(6, 4)
    write_parquet(tmp_path / "toy" / "images.parquet", images, labels)
    assert_rows(load("toy", "train", tmp_path), images, labels)
    with pytest.raises(DataError, match=r"has no split 'test'; its splits are \['train'\]"):
        load("toy", "test", tmp_path)


def test_split_named_by_sub_folder_and_expressions(tmp_path):
    """``val/`` names the ``validation`` split; ``val`` itself is refused with the names datasets gives."""
    train, val = rows(4, 5), rows(3, 6)
    write_parquet(tmp_path / "toy" / "train" / "part-0.parquet", *train)
    write_parquet(tmp_path / "toy" / "val" / "part-0.parquet", *val)
    assert_rows(load("toy", "validation", tmp_path), *val)
    with pytest.raises(DataError, match=r"has no split 'val'; its splits are \['train', 'validation'\]"):
        load("toy", "val", tmp_path)
    both = load("toy", "train+validation", tmp_path)
    assert_rows(both, np.concatenate([train[0], val[0]]), train[1] + val[1])
    assert_rows(load("toy", "train[:2]", tmp_path), train[0][:2], train[1][:2])
    with pytest.raises(DataError, match=r"has no split 'test' \(asked for split 'train\+test'\)"):
        load("toy", "train+test", tmp_path)


def test_imagefolder_layout(tmp_path):
    written: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for split, n, seed in (("train", 3, 7), ("test", 2, 8)):
        images, labels = [], []
        for label, name in enumerate(("cat", "dog")):
            (tmp_path / "pets" / split / name).mkdir(parents=True)
            for i, a in enumerate(rows(n, seed + 10 * label)[0]):
                Image.fromarray(a).save(tmp_path / "pets" / split / name / f"{i}.png")
                images.append(a)
                labels.append(label)
        written[split] = images, labels
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are \['train', 'test'\]"):
        load("pets", "validation", tmp_path)
    for split, (images, labels) in written.items():
        ds = load("pets", split, tmp_path)
        assert ds.class_names == ["cat", "dog"] and sorted(ds.labels.tolist()) == sorted(labels)
        got = {np.asarray(ds.get_image(i)).tobytes(): int(ds.labels[i]) for i in range(len(ds))}
        assert got == {a.tobytes(): y for a, y in zip(images, labels)}  # the split's images, each with its class


def test_fingerprint_follows_split_data_and_folder(tmp_path):
    write_parquet(tmp_path / "toy" / "train.parquet", *rows(4, 9))
    write_parquet(tmp_path / "toy" / "test.parquet", *rows(4, 10))
    train, test = load("toy", "train", tmp_path), load("toy", "test", tmp_path)
    assert load("toy", "train", tmp_path).fingerprint == train.fingerprint  # stable on reload
    assert test.fingerprint != train.fingerprint
    assert load("toy", "train[:2]", tmp_path).fingerprint != train.fingerprint
    shutil.copytree(tmp_path / "toy", tmp_path / "copy" / "toy")
    assert load("toy", "train", tmp_path / "copy").fingerprint != train.fingerprint  # another folder
    content = train.fingerprint_for("content")
    assert content != train.fingerprint
    assert load("toy", "train", tmp_path / "copy").fingerprint_for("content") != content
    write_parquet(tmp_path / "toy" / "train.parquet", *rows(4, 11))  # new data, same file name
    again = load("toy", "train", tmp_path)
    assert again.fingerprint != train.fingerprint and again.fingerprint_for("content") != content
    assert load("toy", "test", tmp_path).fingerprint == test.fingerprint  # the test split's file is unchanged


def test_hub_id_reads_the_hf_cache_offline(tmp_path, hf_cache):
    """A hub dataset downloaded once sits in the cache as ``<org>___<name>/default/0.0.0/<revision>/``; offline it
    is read from there, and its splits are checked the same way."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    train, test = rows(4, 12), rows(2, 13)
    write_parquet(tmp_path / "src" / "train.parquet", *train)
    write_parquet(tmp_path / "src" / "test.parquet", *test)
    builder = Parquet(data_files={s: str(tmp_path / "src" / f"{s}.parquet") for s in ("train", "test")},
                      dataset_name="toy", hash="0123abcd", cache_dir=str(hf_cache))
    builder.download_and_prepare()
    (hf_cache / "someone___toy").mkdir()
    [built] = (hf_cache / "toy").iterdir()  # default-<data files hash>: the config a hub download calls default
    built.rename(hf_cache / "someone___toy" / "default")
    shutil.rmtree(tmp_path / "src")  # nothing but the cache is left
    ds = resolve_dataset({"source": "hf", "path": "someone/toy", "split": "train"})
    assert_rows(ds, *train)
    with pytest.raises(DataError, match=r"'someone/toy' has no split 'validation'; its splits are \['train', 'test'\]"):
        resolve_dataset({"source": "hf", "path": "someone/toy", "split": "validation"})
