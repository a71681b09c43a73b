"""Corruptions (seeded), digits_c, and the corruption task against a direct evaluation and scikit-learn."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from prosmin_bench import cards, config
from prosmin_bench.data import corruptions, resolve_dataset
from prosmin_bench.data.base import ArrayImageDataset
from prosmin_bench.errors import CardError, DataError
from prosmin_bench.metrics import ALEXNET_ERRORS, CORRUPTIONS
from prosmin_bench.results import ResultRecord
from prosmin_bench.runner import RunOptions, evaluate
from prosmin_bench.tasks.corruption import alexnet_errors

N_IMAGES = 24  # digits_c on the first 24 test images keeps this file fast; the full set is the same code


def test_corrupt_image_is_seeded_and_leaves_numpys_rng_alone():
    img = resolve_dataset("digits:test").images[3]
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    for c in ("gaussian_noise", "glass_blur", "impulse_noise", "frost"):
        a = corruptions.corrupt_image(img, c, 3, seed=7)
        assert np.array_equal(a, corruptions.corrupt_image(img, c, 3, seed=7)), c
        assert not np.array_equal(a, corruptions.corrupt_image(img, c, 3, seed=8)), c
        assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(np.random.get_state()[1], state)
    with pytest.raises(DataError, match="at least 32 px"):
        corruptions.corrupt_image(img[:16, :16], "fog", 1, seed=0)
    with pytest.raises(DataError, match="15 ImageNet-C corruptions"):
        corruptions.corrupt_image(img, "spatter", 1, seed=0)


def test_alexnet_table_is_read_by_name_from_the_shipped_csv():
    assert alexnet_errors() == ALEXNET_ERRORS


def test_a_card_with_fewer_than_15_corruptions_is_refused(tmp_path):
    from prosmin_bench.tasks import get_task_spec

    d = tmp_path / "cards"
    d.mkdir()
    (d / "c.toml").write_text(textwrap.dedent(f"""
        name = "t_c14"
        kind = "corruption"
        version = 1
        suite = "mini"
        main_score = "mce"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        [protocol]
        corrupted = "digits_c"
        head_task = "digits_linear"
        baseline = "pixel_tree"
        corruptions = {list(CORRUPTIONS[:-1])}
    """).replace("'", '"'))
    cards.add_card_dir(d)
    with pytest.raises(CardError, match=r"never fewer.*missing \['jpeg_compression'\]"):
        get_task_spec("t_c14")


@pytest.fixture
def small_digits_c(monkeypatch):
    """The first N_IMAGES digits test images as both the clean test split and digits_c's base, so the clean and
    corrupted sets hold the same images, as the task requires."""
    import dataclasses

    from prosmin_bench.data import DATASETS
    from prosmin_bench.data.bundled import load_digits_split

    base = resolve_dataset("digits:test")
    small = ArrayImageDataset(base.images[:N_IMAGES], base.labels[:N_IMAGES], base.class_names,
                              f"{base.fingerprint}-first{N_IMAGES}")
    monkeypatch.setattr(corruptions, "digits_c_base", lambda: small)
    spec = DATASETS.get("digits")
    DATASETS.add("digits", dataclasses.replace(spec, loader=lambda split, root=None: (
        small if split == "test" else load_digits_split(split))), replace=True)
    yield small
    DATASETS.add("digits", spec, replace=True)


def test_digits_c_matches_a_direct_evaluation(tmp_path, small_digits_c):
    from sklearn.tree import DecisionTreeClassifier

    from prosmin_bench.models import get_model

    (rec,) = evaluate(["random_micro"], ["digits_c"], options=RunOptions(seeds=(0,), device="cpu",
                                                                          results_dir=tmp_path / "r"))
    assert isinstance(rec, ResultRecord)
    m, ex = rec.mean, rec.extras
    # generated once, cached atomically under the data cache, deterministic
    fog3 = resolve_dataset("digits_c:fog/3")
    assert len(fog3) == N_IMAGES and list((config.data_cache_dir()).rglob("fog-3.npy"))
    assert np.array_equal(fog3.images, corruptions.corrupt_array(small_digits_c.images, "fog", 3, 0))

    # per-severity errors of the digits_linear head, by a direct forward pass (no feature cache)
    model = get_model("random_micro")
    (head,) = config.heads_dir().rglob("*.pt")
    blob = torch.load(head, weights_only=True)
    for c, s in (("gaussian_noise", 1), ("contrast", 5), ("glass_blur", 4)):
        imgs = resolve_dataset(f"digits_c:{c}/{s}").images
        x = torch.stack([model.transform(Image.fromarray(im)) for im in imgs])
        with torch.no_grad():
            logits = model.features(x, "cls_last4") @ blob["weight"].T + blob["bias"]
        err = float((logits.argmax(1).numpy() != small_digits_c.labels).mean())
        assert m[f"error_{c}_s{s}"] == pytest.approx(err)

    # the pixel_tree reference: sklearn's tree on raw grey pixels, fit here independently
    def grey(ims):
        return ims.astype(np.float64).mean(axis=3).reshape(len(ims), -1) / 255.0

    train, test = resolve_dataset("digits:train"), resolve_dataset("digits:test")
    tree = DecisionTreeClassifier(random_state=0).fit(grey(train.images), train.labels)
    base = ex["baseline"]
    assert base["clean_error"] == pytest.approx(float((tree.predict(grey(test.images)) != test.labels).mean()))
    pix = resolve_dataset("digits_c:pixelate/2")
    assert base["errors"]["pixelate"][1] == pytest.approx(float((tree.predict(grey(pix.images)) != pix.labels).mean()))

    # mCE by hand from the recorded tables; every corruption and severity is there
    errors = ex["errors"]
    assert sorted(errors) == sorted(CORRUPTIONS) and all(len(v) == 5 for v in errors.values())
    ce = {c: sum(errors[c]) / sum(base["errors"][c]) for c in CORRUPTIONS}
    assert m["mce"] == pytest.approx(100 * np.mean(list(ce.values())))
    assert m["ce_fog"] == pytest.approx(ce["fog"])
    assert m["clean_error"] == pytest.approx(1 - evaluate(["random_micro"], ["digits_linear"], options=RunOptions(
        seeds=(0,), device="cpu", results_dir=tmp_path / "r"))[0].mean["top1"])
    if ex["relative_undefined_for"]:  # 24 images: the tree may be unhurt by a mild corruption
        assert np.isnan(m["relative_mce"])
    else:
        rel = [(sum(errors[c]) - 5 * m["clean_error"]) / (sum(base["errors"][c]) - 5 * base["clean_error"])
               for c in CORRUPTIONS]
        assert m["relative_mce"] == pytest.approx(100 * np.mean(rel))
