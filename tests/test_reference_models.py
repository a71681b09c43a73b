"""The non-learned reference models ``pixels`` and ``pixels_randproj``: their features against the preprocessed image
and a projection computed here, their identity, their place in the mini suite, and a run through ``evaluate``."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch

import prosmin_bench
from prosmin_bench import cards
from prosmin_bench.data import resolve_dataset
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.models import get_model
from prosmin_bench.models.weights import sha256_state_dict
from prosmin_bench.results import ResultRecord

FAST_LINEAR = """
    name = "ref_linear_fast"
    kind = "linear"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    layer = "cls_last4"
    epochs = 3
    base_lrs = [0.01, 0.1]
    lr_bounds = [0.01, 0.1]
"""


def _direct_pixels(images: list) -> torch.Tensor:
    """The mini eval preprocessing done by hand: uint8 RGB -> [0, 1] -> (x - 0.5) / 0.5, channels first, flattened
    in (channel, row, column) order: [N, 3 * 32 * 32]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])  # [N, 32, 32, 3]
    chw = (arr - 0.5) / 0.5
    return torch.from_numpy(chw.transpose(0, 3, 1, 2).reshape(len(images), -1).copy())


def _images(n: int = 12) -> list:
    ds = resolve_dataset("digits:test")
    return [ds.get_image(i) for i in range(n)]


@pytest.mark.parametrize("layer", ["cls", "cls_last4", "avgpool"])
def test_pixels_features_are_the_flattened_preprocessed_image_in_every_layer(layer):
    model = get_model("pixels")
    images = _images()
    batch = torch.stack([model.transform(im) for im in images])
    with torch.no_grad():
        got = model.features(batch, layer).double()
    assert got.shape == (len(images), 3072) and model.layer_dim(layer) == 3072
    torch.testing.assert_close(got, _direct_pixels(images), rtol=0, atol=1e-6)


def test_pixels_randproj_is_the_documented_gaussian_projection():
    model = get_model("pixels_randproj")
    images = _images()
    batch = torch.stack([model.transform(im) for im in images])
    # The documented projection: seed 0, P[i, j] ~ N(0, 1) from torch.randn, [3072, 384], scaled by 1 / sqrt(384).
    p = torch.randn(3072, 384, generator=torch.Generator().manual_seed(0), dtype=torch.float32).double() / math.sqrt(384)
    expected = _direct_pixels(images) @ p
    with torch.no_grad():
        for layer in ("cls", "cls_last4"):
            got = model.features(batch, layer).double()
            assert got.shape == (len(images), 384) and model.layer_dim(layer) == 384
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # Johnson-Lindenstrauss scaling: squared norms kept on average (within a few percent at 384 dimensions).
    ratio = (expected.norm(dim=1) ** 2 / _direct_pixels(images).norm(dim=1) ** 2).mean().item()
    assert 0.85 < ratio < 1.15


def test_references_are_fixed_models_identified_by_their_state():
    a, b = get_model("pixels_randproj"), get_model("pixels_randproj")
    assert a.weights_sha256 == b.weights_sha256 != get_model("pixels").weights_sha256
    p = torch.randn(3072, 384, generator=torch.Generator().manual_seed(0)) / math.sqrt(384)
    shape = torch.tensor([3, 32, 32])
    assert a.weights_sha256 == sha256_state_dict({"input_shape": shape, "projection": p})
    assert get_model("pixels").weights_sha256 == sha256_state_dict({"input_shape": shape})
    for name in ("pixels", "pixels_randproj"):
        spec = prosmin_bench.models.get_model_spec(name)
        assert spec.reference and spec.method == "reference" and spec.scale == "mini"
        assert not list(get_model(name).parameters())  # nothing to learn: the projection is a buffer


def test_fine_tuning_a_reference_trains_only_the_head():
    from prosmin_bench.tasks.finetune import Classifier

    model = get_model("pixels_randproj")
    clf = Classifier(model, num_classes=10, layer="cls", seed=0)
    trainable = [n for n, p in clf.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"] and clf.head.in_features == 384
    before = clf.backbone.net.projection.clone()
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    x = torch.randn(8, 3, 32, 32)
    torch.nn.functional.cross_entropy(clf(x), torch.arange(8)).backward()
    opt.step()
    assert torch.equal(clf.backbone.net.projection, before) and torch.equal(model.net.projection, before)


def test_images_of_another_size_are_a_one_line_error():
    with pytest.raises(ProsminBenchError) as err:
        get_model("pixels").features(torch.zeros(2, 3, 64, 64), "cls")
    assert "[N, 3, 32, 32]" in str(err.value) and "\n" not in str(err.value)


def test_the_mini_suite_includes_the_references_by_default():
    from prosmin_bench.suite import select, suite_models

    assert {"pixels", "pixels_randproj"} <= set(suite_models("mini"))
    assert {"pixels", "pixels_randproj"} <= set(select().models)  # `prosmin-bench run` with no arguments
    assert set(select(["pixels"]).tasks) == set(select().tasks)  # --model pixels: every mini task


def test_references_run_through_evaluate_and_are_marked_as_references(tmp_path):
    d = tmp_path / "cards"
    d.mkdir()
    (d / "fast.toml").write_text(textwrap.dedent(FAST_LINEAR))
    cards.add_card_dir(d)
    recs = prosmin_bench.evaluate(["pixels", "pixels_randproj"], ["digits_knn", "ref_linear_fast"], seeds=(0,),
                                  results_dir=tmp_path / "r")
    assert len(recs) == 4 and all(isinstance(r, ResultRecord) for r in recs), [getattr(r, "message", "") for r in recs]
    for r in recs:
        assert r.model_info.get("reference") is True and r.model_info["method"] == "reference"
    knn = {r.model: r for r in recs if r.task == "digits_knn"}
    # Weighted 20-NN on the raw pixels, computed here (DINO protocol: cosine similarity, exp(sim / 0.07) votes).
    train, test = resolve_dataset("digits:train"), resolve_dataset("digits:test")
    xtr = torch.nn.functional.normalize(_direct_pixels([train.get_image(i) for i in range(len(train))]), dim=1)
    xte = torch.nn.functional.normalize(_direct_pixels([test.get_image(i) for i in range(len(test))]), dim=1)
    s, i = (xte @ xtr.T).topk(20, dim=1)
    ytr = torch.as_tensor(train.labels)
    votes = torch.zeros(len(xte), 10, dtype=torch.float64).scatter_add_(1, ytr[i], (s / 0.07).exp())
    direct = (votes.argmax(1) == torch.as_tensor(test.labels)).double().mean().item()
    assert knn["pixels"].mean["top1_k20"] == pytest.approx(direct, abs=1.5 / len(xte))  # float32 vs float64 ties
    assert knn["pixels"].mean["top1_k20"] > 0.9  # raw pixels are a strong k-NN baseline on the digits
