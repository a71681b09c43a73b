"""Issue 19 item 2: the DeiT fine-tuning recipe from timm's objects (RandAugment, random erasing, Mixup / CutMix,
SoftTargetCrossEntropy, stochastic depth) and iBOT's ``finetune_head_layer = 1``, checked against timm objects built
independently and against the projection head's own layers."""

from __future__ import annotations

import logging
import random
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer

from prosmin_bench import cards
from prosmin_bench.errors import CardError
from prosmin_bench.models import get_model
from prosmin_bench.models.heads import build_mlp
from prosmin_bench.results import ResultRecord
from prosmin_bench.runner import RunOptions, evaluate
from prosmin_bench.tasks import build_task, get_task_spec
from prosmin_bench.tasks import finetune as ft
from prosmin_bench.tasks import finetune_recipe
from prosmin_bench.tasks.finetune import FinetuneParams, build_mixup, set_drop_path, train_transform


def _card_params(name: str) -> FinetuneParams:
    return build_task(get_task_spec(name)).params


def _digit_images(n: int) -> list:
    from prosmin_bench.data import resolve_dataset

    ds = resolve_dataset("digits:train")
    return [ds[i][0] for i in range(n)]  # PIL images (no transform)


def test_training_transform_is_timms_create_transform_with_the_cards_fields():
    p = _card_params("imagenet_semisup_1pct")
    model = get_model("random_micro")
    pre = model.spec.preprocess
    ours = train_transform(model, p)
    ref = create_transform(input_size=pre.crop, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4,
                           auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", mean=tuple(pre.mean),
                           std=tuple(pre.std), re_prob=0.25, re_mode="pixel", re_count=1)
    assert repr(ours) == repr(ref)
    (ra,) = [t for t in ours.transforms if isinstance(t, RandAugment)]
    assert ra.num_layers == 2 and {op.magnitude for op in ra.ops} == {9}
    assert {op.magnitude_std for op in ra.ops} == {0.5}
    assert "PosterizeIncreasing" in {op.name for op in ra.ops}  # inc1: the increasing variants
    (erase,) = [t for t in ours.transforms if isinstance(t, RandomErasing)]
    assert erase.probability == 0.25 and erase.mode == "pixel" and erase.max_count == 1
    images = _digit_images(8)
    for seed in range(6):  # identical draws from identical generator states give identical tensors
        outs = []
        for tf in (ours, ref):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            outs.append(torch.stack([tf(img) for img in images]))
        assert outs[0].shape == (8, 3, pre.crop, pre.crop) and torch.equal(outs[0], outs[1])


def test_posterize_at_zero_bits_gives_the_black_image_older_pillow_gave():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert not np.asarray(finetune_recipe._posterize(img, 0)).any()
    assert np.array_equal(np.asarray(finetune_recipe._posterize(img, 3)), np.asarray(img) & 0b11100000)
    assert finetune_recipe._posterize(img, 8) is img


def test_mixup_is_timms_with_the_cards_settings_and_the_loss_is_soft_target_ce(monkeypatch):
    p = _card_params("transfer_cifar10")
    mix = build_mixup(p, 10)
    assert type(mix) is Mixup
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.mode, mix.label_smoothing,
            mix.num_classes) == (0.8, 1.0, 1.0, 0.5, "batch", 0.1, 10)
    assert build_mixup(FinetuneParams(mixup=0.0, cutmix=0.0), 10) is None
    calls = []

    class SpyLoss(SoftTargetCrossEntropy):
        def forward(self, x, target):
            calls.append(target.detach().clone())
            return super().forward(x, target)

    monkeypatch.setattr(ft, "SoftTargetCrossEntropy", SpyLoss)
    ds = _bright_dark(21, 0)  # 21 - 5 held out = 16 to fit: batches of 6, 6, 4
    params = FinetuneParams(epochs=1, batch_size=6, lr=1e-2, warmup_epochs=0, crop_scale=(0.8, 1.0),
                            val_fraction=0.25)
    res = ft.finetune(get_model("random_micro"), ds, ds.labels, 2, params, seed=0, device=torch.device("cpu"))
    assert len(calls) == 3 and all(t.shape[1] == 2 for t in calls)
    assert all(torch.allclose(t.sum(1), torch.ones(len(t))) for t in calls)  # soft targets
    assert all(t.min() >= 0.1 / 2 - 1e-6 for t in calls)  # label smoothing 0.1 went into them
    assert res.recipe["mixup"]["mixup_alpha"] == 0.8 and "SoftTargetCrossEntropy" in res.recipe["loss"]


def test_odd_batches_lose_one_image_for_mixup():
    from prosmin_bench.tasks.probes import stratified_holdout

    n = next(n for n in range(16, 40) if len(stratified_holdout(np.arange(n) % 2, 0.25, 0)[0]) % 8 in (3, 5, 7))
    fit = len(stratified_holdout(np.arange(n) % 2, 0.25, 0)[0])
    ds = _bright_dark(n, 1)  # the last batch of 8 is odd: it loses one image
    seen = []
    orig = Mixup.__call__

    def spy(self, x, target):
        seen.append(len(x))
        return orig(self, x, target)

    Mixup.__call__ = spy
    try:
        params = FinetuneParams(epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0, val_fraction=0.25)
        ft.finetune(get_model("random_micro"), ds, ds.labels, 2, params, seed=0, device=torch.device("cpu"))
    finally:
        Mixup.__call__ = orig
    assert seen == [8] * (fit // 8) + [fit % 8 - 1]


def test_drop_path_per_block_follows_timms_linear_rule():
    model = get_model("random_micro")
    net = model.trainable_copy().net
    depth = len(net.blocks)
    rates = set_drop_path(net, 0.1)
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=depth, num_heads=2, drop_path_rate=0.1)
    expected = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in ref.blocks]
    assert rates == pytest.approx(expected) and expected[0] == 0.0 and expected[-1] == pytest.approx(0.1)
    for blk, r in zip(net.blocks, expected):
        for dp in (blk.drop_path1, blk.drop_path2):
            assert (isinstance(dp, DropPath) and dp.drop_prob == pytest.approx(r)) or (r == 0 and
                                                                                      isinstance(dp, nn.Identity))
    assert all(isinstance(b.drop_path1, nn.Identity) for b in model.net.blocks)  # the model itself untouched
    pixels = get_model("pixels_randproj").trainable_copy().net
    assert set_drop_path(pixels, 0.1) == []  # no timm blocks: nothing to do


@pytest.fixture(scope="module")
def dino_ckpt(tmp_path_factory):
    """A checkpoint of the suite's pretraining (one DINO step): it carries the projection head."""
    from prosmin_bench.pretrain import pretrain

    return pretrain("dino_micro", out_dir=tmp_path_factory.mktemp("dino_ckpt"), device="cpu",
                    overrides={"run.max_steps": 1, "optim.batch_size": 16})


def test_head_layer_1_starts_from_the_projection_heads_first_layer(dino_ckpt):
    model = get_model("dino_micro", weights=dino_ckpt)
    assert model.has_projector
    neck, used = ft.head_neck(model, FinetuneParams(finetune_head_layer=1), "t")
    mlp = model.projector_head.head.mlp
    k = next(i for i, m in enumerate(mlp) if isinstance(m, nn.GELU))  # the first layer ends with its activation
    # dino_micro's head has BN (head_use_bn): Linear + BN + GELU; DINO's default head: Linear + GELU (iBOT's layer)
    assert used == 1 and [type(m) for m in neck] == [type(m) for m in mlp[: k + 1]] and type(neck[0]) is nn.Linear
    clf = ft.Classifier(model, 10, "cls", 0, neck=neck).eval()
    assert clf.head.in_features == mlp[0].out_features
    assert all(p.requires_grad for p in clf.neck.parameters())
    assert all(not p.requires_grad for p in mlp.parameters())  # a copy is fine-tuned, not the model's head
    x = torch.stack([model.transform(img) for img in _digit_images(6)])
    seen = []
    clf.head.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        clf(x)
        expected = mlp[: k + 1](model.features(x, "cls"))  # the head's own first layer, on the final-norm CLS
    torch.testing.assert_close(seen[0], expected)


def test_head_layer_1_keeps_the_batchnorm_of_a_mocov3_projector():
    model = get_model("random_micro")
    head = build_mlp(3, model.embed_dim, 16, 8)
    projector = nn.Module()  # what a MoCo-v3 checkpoint's projector holds: backbone -> head (models/networks.py)
    projector.backbone, projector.head = model.net, head
    model.projector_head = projector
    first = model.projector_first_layer()
    assert [type(m) for m in first] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert torch.equal(first[0].weight, head[0].weight) and first[0].weight is not head[0].weight


def test_head_layer_1_without_a_head_falls_back_with_one_warning(caplog):
    ft._HEAD_FALLBACK_WARNED.clear()
    model = get_model("random_micro")
    ds = _bright_dark(24, 2)
    params = FinetuneParams(epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0, val_fraction=0.25,
                            finetune_head_layer=1)
    with caplog.at_level(logging.WARNING, logger="prosmin_bench.tasks.finetune"):
        runs = [ft.finetune(model, ds, ds.labels, 2, params, seed=s, device=torch.device("cpu")) for s in (0, 1)]
    assert [r.recipe["finetune_head_layer_used"] for r in runs] == [0, 0]
    warnings = [r for r in caplog.records if "finetune_head_layer" in r.getMessage()]
    assert len(warnings) == 1 and "random_micro" in warnings[0].getMessage()
    assert runs[0].model.head.in_features == model.embed_dim


def _bright_dark(n: int, seed: int):
    from prosmin_bench.data.base import ArrayImageDataset

    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    imgs = np.clip(np.where(y[:, None, None, None] == 1, 200, 50) + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255)
    return ArrayImageDataset(imgs.astype(np.uint8), y, ["dark", "bright"], f"bright-dark-{n}-{seed}")


CARD = """
    name = "t_semisup_recipe"
    kind = "semisup"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    fraction = 0.05
    epochs = 2
    batch_size = 32
    lr = 1e-2
    warmup_epochs = 1
    hflip = false
    crop_scale = [0.6, 1.0]
    rand_augment = "rand-m9-mstd0.5-inc1"
    random_erasing = 0.25
    mixup = 0.8
    cutmix = 1.0
    drop_path = 0.1
    finetune_head_layer = 1
    val_fraction = 0.2
"""


def test_full_recipe_end_to_end_with_head_layer_1(tmp_path, dino_ckpt):
    d = tmp_path / "cards"
    d.mkdir()
    (d / "t.toml").write_text(textwrap.dedent(CARD))
    cards.add_card_dir(d)
    (rec,) = evaluate(["dino_micro"], ["t_semisup_recipe"],
                      options=RunOptions(seeds=(0,), device="cpu", weights=str(dino_ckpt), results_dir=tmp_path / "r"))
    assert isinstance(rec, ResultRecord), getattr(rec, "message", rec)
    assert all(np.isfinite(v) for v in rec.mean.values()) and 0 <= rec.mean["top1"] <= 1
    assert len(rec.extras["history"]) == 2 and rec.extras["finetune_head_layer_used"] == 1
    recipe = rec.extras["recipe"]
    assert "RandAugment" in recipe["train_transform"] and "RandomErasing" in recipe["train_transform"]
    assert recipe["mixup"]["cutmix_alpha"] == 1.0 and len(recipe["drop_path_per_block"]) >= 1
    assert rec.protocol["rand_augment"] == "rand-m9-mstd0.5-inc1" and rec.protocol["finetune_head_layer"] == 1


def test_the_shipped_cards_carry_the_recipe():
    semi = _card_params("imagenet_semisup_10pct")
    assert (semi.batch_size, semi.lr, semi.finetune_head_layer, semi.min_lr) == (1024, 5e-6, 1, 1e-5)
    inat = _card_params("transfer_inat18")
    assert (inat.random_erasing, inat.finetune_head_layer, inat.lr) == (0.1, 0, 5e-5)
    for name in ("imagenet_semisup_1pct", "imagenet_semisup_10pct", "transfer_cifar10", "transfer_cifar100",
                 "transfer_flowers102", "transfer_inat18"):
        spec = get_task_spec(name)
        p = _card_params(name)
        assert spec.version >= 2 and spec.deviations, name
        assert (p.rand_augment, p.mixup, p.cutmix, p.drop_path) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1), name
    assert not _card_params("digits_semisup_10pct").hflip


@pytest.mark.parametrize("line, field", [
    ('rand_augment = "rand-m9-foo1"', "rand_augment"),
    ('rand_augment = "rand-mX"', "rand_augment"),
    ('rand_augment = "augmix-m5"', "rand_augment"),
    ("mixup = -0.5", "mixup"),
    ('mixup_mode = "every"', "mixup_mode"),
    ("mixup_prob = 1.5", "mixup_prob"),
    ("random_erasing = 1.5", "random_erasing"),
    ('re_mode = "noise"', "re_mode"),
    ("drop_path = 1.0", "drop_path"),
    ("finetune_head_layer = 2", "finetune_head_layer"),
    ('finetune_head_layer = 1\nlayer = "avgpool"', "finetune_head_layer"),
    ('train_interpolation = "cubic"', "train_interpolation"),
    ("min_lr = -1.0", "min_lr"),
])
def test_bad_recipe_fields_are_card_errors(tmp_path, line, field):
    d = tmp_path / "cards"
    d.mkdir()
    keys = {part.split(" = ")[0] for part in line.splitlines()}
    body = [ln for ln in textwrap.dedent(CARD).splitlines() if ln.split(" = ")[0] not in keys]
    (d / "t.toml").write_text("\n".join(body) + "\n" + line + "\n")
    cards.add_card_dir(d)
    with pytest.raises(CardError) as err:
        build_task(get_task_spec("t_semisup_recipe"))
    msg = str(err.value)
    assert f"'{field}'" in msg and "t.toml" in msg and "Traceback" not in msg
