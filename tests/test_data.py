"""Mini data (embedded, offline) and the generic sources, on data the tests make."""

import numpy as np
import pytest
from PIL import Image

from prosmin_bench.data import DATASETS, list_image_folder, resolve_dataset
from prosmin_bench.errors import DataError


def test_digits_split_is_fixed_stratified_80_20():
    from sklearn.datasets import load_digits

    train, test = resolve_dataset("digits:train"), resolve_dataset("digits:test")
    assert len(train) == 1437 and len(test) == 360
    y = load_digits().target
    for c in range(10):  # stratified: each class ~20% in test
        assert abs((test.labels == c).sum() / (y == c).sum() - 0.2) < 0.02
    img, label = train[0]
    assert img.size == (32, 32) and img.mode == "RGB"
    # the upsampled image keeps the digit: downsample back and compare with the 8x8 original (scaled to 0..255)
    arr = np.asarray(img.convert("L").resize((8, 8), Image.BILINEAR), dtype=float)
    assert arr.max() > 100 and arr.min() < 40
    again = resolve_dataset("digits:test")
    assert np.array_equal(again.labels, test.labels) and again.fingerprint == test.fingerprint


def test_digits_o_and_lfw_are_in_the_digits_format():
    ood = resolve_dataset("digits_o:test")
    assert len(ood) == 360 and ood.images.shape[1:] == (32, 32, 3)
    # grey images: the three channels are equal
    assert np.array_equal(ood.images[..., 0], ood.images[..., 2])
    lfw_tr, lfw_te = resolve_dataset("lfw:train"), resolve_dataset("lfw:test")
    assert len(lfw_tr) + len(lfw_te) == 200 and set(lfw_te.labels.tolist()) == {0, 1}


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("b_cat", "a_dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = resolve_dataset({"source": "imagefolder", "root": "."}, data_root=tmp_path)
    assert ds.class_names == ["a_dog", "b_cat"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    img, y = ds[4]
    assert img.size == (24, 20) and y == 1


def test_image_folder_errors_say_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_image_folder(tmp_path / "missing")
    (tmp_path / "flat.png").write_bytes(b"x")
    with pytest.raises(DataError, match="no class subfolders"):
        list_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_image_folder(tmp_path)


def test_truncated_image_is_named(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "ok.png")
    good = (tmp_path / "c" / "ok.png").read_bytes()
    (tmp_path / "c" / "bad.png").write_bytes(good[: len(good) // 2])
    ds = list_image_folder(tmp_path)
    with pytest.raises(DataError, match="bad.png"):
        [ds[i] for i in range(len(ds))]


def test_hf_source_offline_on_local_parquet(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(6)],
         "label": [0, 1, 0, 1, 1, 0]}, features=feats)
    (tmp_path / "toy").mkdir()
    ds.to_parquet(str(tmp_path / "toy" / "train.parquet"))
    loaded = resolve_dataset({"source": "hf", "path": "toy", "split": "train"}, data_root=tmp_path)
    assert loaded.labels.tolist() == [0, 1, 0, 1, 1, 0] and loaded.class_names == ["x", "y"]
    assert loaded[1][0].size == (16, 16)
    with pytest.raises(DataError, match="no column 'img'"):
        resolve_dataset({"source": "hf", "path": "toy", "split": "train", "image_column": "img"}, data_root=tmp_path)


def test_hf_hub_id_offline_is_a_clear_error():
    with pytest.raises(DataError, match="Could not load HF dataset 'surely-not/a-dataset'"):
        resolve_dataset({"source": "hf", "path": "surely-not/a-dataset", "split": "train"})


def test_unknown_dataset_and_split():
    from prosmin_bench.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean 'digits'"):
        resolve_dataset("digitz:train")
    with pytest.raises(DataError, match="has no split 'val'"):
        resolve_dataset("digits:val")
    assert "imagenet" in DATASETS
