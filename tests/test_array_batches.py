"""The batched eval transform of in-memory mini data (features.array_batches) gives torchvision's bits."""

import numpy as np
import pytest
import torch

from prosmin_bench.data.base import ArrayImageDataset
from prosmin_bench.features import array_batches
from prosmin_bench.models.spec import MINI_PREPROCESS, Preprocess


def _dataset(n=37, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArrayImageDataset(images, rng.integers(0, 10, n), [str(i) for i in range(10)], "t")


@pytest.mark.parametrize("indices", [None, [5, 3, 30, 0, 1]])
def test_same_bits_as_torchvision_per_image(indices):
    ds, tf = _dataset(), MINI_PREPROCESS.build()
    fast = list(array_batches(ds, tf, 4, indices))
    items = ds.with_transform(tf)
    order = range(len(ds)) if indices is None else indices
    ref = [items[i] for i in order]  # torchvision on each PIL image
    got = torch.cat([b for b, _ in fast])
    assert torch.equal(got, torch.stack([x for x, _ in ref]))  # bit for bit, not approximately
    assert torch.cat([y for _, y in fast]).tolist() == [y for _, y in ref]


def test_other_transforms_take_the_torchvision_path():
    ds = _dataset()
    cutting = Preprocess(resize=None, crop=28, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3).build()
    assert array_batches(ds, cutting, 4) is None  # the crop cuts the image
    resizing = Preprocess(resize=64, crop=64, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3).build()
    assert array_batches(ds, resizing, 4) is None
    assert array_batches(ds, lambda img: img, 4) is None  # a user's own transform
