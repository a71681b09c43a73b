"""Feature extraction and its cache: features equal the bare backbone forward, stored dtype and autocast precision
as stated, memory-mapped cache hits, half-written entries never read, NaN / float16 overflow refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prosmin_bench.errors import DataError, FeatureError
from prosmin_bench.features import (
    MAX_LOADER_WORKERS, cache_key, compute_features, default_num_workers, extract, load_cached, store,
)

N = 45


@pytest.fixture(scope="module")
def model():
    from prosmin_bench.models import get_model

    return get_model("random_micro")


def digits(n: int = N):
    from prosmin_bench.data.base import ArrayImageDataset
    from prosmin_bench.data.bundled import load_digits_split

    d = load_digits_split("train")
    return ArrayImageDataset(d.images[:n], d.labels[:n], d.class_names, f"digits-first{n}")


def bare_forward(model, ds, dtype=None) -> torch.Tensor:
    """The backbone applied directly to the stacked, transformed images: the reference for extraction."""
    images = torch.stack([model.transform(ds.get_image(i)) for i in range(len(ds))])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return model(images).float()


def test_extracted_features_are_the_bare_backbone_forward(model):
    ds = digits()
    fs = extract(model, ds, dataset_id="d", batch_size=16, cache=False)
    assert fs.computed and fs.features.shape == (N, model.embed_dim) and fs.features.dtype == np.float32
    assert torch.equal(torch.from_numpy(fs.features), bare_forward(model, ds))
    assert np.array_equal(fs.labels, ds.labels)
    assert fs.meta["images_per_second"] > 0 and fs.meta["world_size"] == 1


def test_cache_hit_is_a_memmap_with_the_same_features_and_stated_dtype(model, tmp_path):
    ds = digits()
    first = extract(model, ds, dataset_id="d", batch_size=16, cache_root=tmp_path)
    assert first.computed and isinstance(first.features, np.memmap)  # written straight into the cache file
    second = extract(model, ds, dataset_id="d", batch_size=16, cache_root=tmp_path)
    assert not second.computed and isinstance(second.features, np.memmap) and second.features.mode == "r"
    assert np.array_equal(np.asarray(second.features), np.asarray(first.features))
    assert np.array_equal(second.labels, ds.labels)
    for key, value in {"dtype": "float32", "precision": "fp32", "n": N, "dim": model.embed_dim, "layer": "cls"}.items():
        assert second.meta[key] == value
    assert not list(tmp_path.rglob("*.tmp"))


def test_float16_storage_is_the_float32_features_rounded(model, tmp_path):
    ds = digits()
    fs = extract(model, ds, dataset_id="d", dtype="float16", cache_root=tmp_path)
    assert fs.features.dtype == np.float16 and fs.meta["dtype"] == "float16"
    assert np.array_equal(np.asarray(fs.features), bare_forward(model, ds).numpy().astype(np.float16))
    hit = load_cached(fs.key, tmp_path)
    assert hit.features.dtype == np.float16


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_runs_the_forward_under_autocast(model, precision, dtype):
    ds = digits(20)
    fs = extract(model, ds, dataset_id="d", batch_size=20, precision=precision, cache=False)
    ref = bare_forward(model, ds, dtype)
    assert torch.equal(torch.from_numpy(fs.features), ref)
    fp32 = bare_forward(model, ds)
    assert not torch.equal(ref, fp32)  # autocast really changed the arithmetic
    torch.testing.assert_close(ref, fp32, rtol=0.1, atol=0.1)
    assert fs.meta["precision"] == precision


def test_cache_key_separates_precision_dtype_layer_and_dataset(model):
    base = ("d", "fp", "cls", "fp32", "float32")
    keys = {cache_key(model, *base)}
    for i, other in enumerate(["e", "fq", "avgpool", "bf16", "float16"]):
        args = list(base)
        args[i] = other
        keys.add(cache_key(model, *args))
    assert len(keys) == 6


def test_cache_key_separates_the_networks_of_a_pretraining_checkpoint(model, monkeypatch):
    """One checkpoint file, two networks (MoCo-v3 is evaluated with its online encoder): two keys; the target
    network keeps the key it had before the network was recorded, so existing caches stay valid."""
    base = ("d", "fp", "cls", "fp32", "float32")
    before = cache_key(model, *base)
    monkeypatch.setattr(model, "network", "target", raising=False)
    assert cache_key(model, *base) == before
    monkeypatch.setattr(model, "network", "online", raising=False)
    assert cache_key(model, *base) != before


def test_bad_arguments(model):
    with pytest.raises(FeatureError, match="precision"):
        extract(model, digits(3), dataset_id="d", precision="fp8", cache=False)
    with pytest.raises(FeatureError, match="dtype"):
        extract(model, digits(3), dataset_id="d", dtype="bfloat16", cache=False)
    with pytest.raises(FeatureError, match="no samples"):
        extract(model, digits(0), dataset_id="d", cache=False)


def test_interrupted_extraction_leaves_nothing_and_half_written_entries_are_never_read(model, tmp_path):
    from prosmin_bench.data.base import ArrayImageDataset

    class Broken(ArrayImageDataset):
        def get_image(self, index):
            if index == 30:
                raise DataError("image 30 is unreadable")
            return super().get_image(index)

    d = digits()
    with pytest.raises(DataError):
        extract(model, Broken(d.images, d.labels, d.class_names, "broken"), dataset_id="b", batch_size=8,
                cache_root=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no temp file, no partial entry
    fs = extract(model, d, dataset_id="d", cache_root=tmp_path)
    sidecar = next(tmp_path.rglob(f"{fs.key}.json"))
    sidecar.unlink()  # as if the process died between the arrays and the commit marker
    assert load_cached(fs.key, tmp_path) is None
    again = extract(model, d, dataset_id="d", cache_root=tmp_path)
    assert again.computed and load_cached(fs.key, tmp_path) is not None
    # an entry whose arrays disagree with the sidecar is ignored too
    store(type(fs)(np.zeros((3, 4), np.float32), np.zeros(3, np.int64), fs.key, {**fs.meta, "n": N}), tmp_path)
    assert load_cached(fs.key, tmp_path) is None


def _perturbed(model, **changes):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in changes.items():
            getattr(m.net.norm, name).fill_(value)
    return m


def test_nan_features_are_refused(model):
    with pytest.raises(FeatureError, match="NaN or inf"):
        extract(_perturbed(model, weight=float("nan")), digits(10), dataset_id="d", cache=False)


def test_float16_overflow_is_refused_and_float32_keeps_it(model):
    big = _perturbed(model, bias=1e6)
    with pytest.raises(FeatureError, match="overflow float16"):
        extract(big, digits(10), dataset_id="d", dtype="float16", cache=False)
    assert np.abs(extract(big, digits(10), dataset_id="d", cache=False).features).max() > 65504


def test_loader_workers_and_index_subsets_give_the_same_rows(model):
    ds = digits()
    full, labels, _ = compute_features(model, ds, batch_size=8)
    with_workers, _, _ = compute_features(model, ds, batch_size=8, num_workers=1)
    assert np.array_equal(with_workers, full)
    sub, sub_labels, _ = compute_features(model, ds, batch_size=8, indices=range(7, 30))
    assert np.array_equal(sub, full[7:30]) and np.array_equal(sub_labels, labels[7:30])


def test_default_num_workers_is_sized_from_the_machine(monkeypatch):
    import os

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == max(0, min(MAX_LOADER_WORKERS, cpus - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))  # more processes on this node than CPUs
    assert default_num_workers() == 0
