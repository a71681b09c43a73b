"""The shared fine-tuning loop (semi-supervised and transfer tasks): schedule, parameter groups, selection on
held-out data, determinism, and the two task kinds end to end."""

from __future__ import annotations

import copy
import math
import textwrap

import numpy as np
import pytest
import torch

from prosmin_bench import cards
from prosmin_bench.data.base import ArrayImageDataset
from prosmin_bench.models import get_model
from prosmin_bench.results import ResultRecord
from prosmin_bench.runner import RunOptions, evaluate
from prosmin_bench.tasks.finetune import FinetuneParams, _lr_at, _param_groups, finetune


def test_lr_schedule_is_linear_warmup_then_cosine():
    base, total, warm = 1e-3, 100, 10
    assert _lr_at(0, total, warm, base) == pytest.approx(1e-6)
    assert _lr_at(5, total, warm, base) == pytest.approx(1e-6 + (base - 1e-6) * 0.5)
    assert _lr_at(10, total, warm, base) == pytest.approx(base)
    t = (55 - warm) / (total - warm)
    assert _lr_at(55, total, warm, base) == pytest.approx(1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * t)))
    assert _lr_at(100, total, warm, base) == pytest.approx(1e-6)


def test_no_weight_decay_on_biases_norms_and_tokens():
    net = copy.deepcopy(get_model("random_micro").net).requires_grad_(True)
    decay, no_decay = _param_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= nd
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def _bright_dark(n: int, seed: int) -> ArrayImageDataset:
    """Class 1: bright images, class 0: dark ones (trivially separable): [n, 32, 32, 3]."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    base = np.where(y[:, None, None, None] == 1, 200, 50)
    imgs = np.clip(base + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return ArrayImageDataset(imgs, y, ["dark", "bright"], f"bright-dark-{n}-{seed}")


def test_finetune_learns_selects_on_held_out_and_leaves_the_backbone_alone():
    model = get_model("random_micro")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    ds = _bright_dark(48, 0)
    p = FinetuneParams(epochs=3, batch_size=16, lr=4e-2, warmup_epochs=0, crop_scale=(0.8, 1.0), hflip=False,
                       val_fraction=0.25)
    run = lambda: finetune(model, ds, ds.labels, 2, p, seed=0, device=torch.device("cpu"))  # noqa: E731
    a, b = run(), run()
    assert [h["val_top1"] for h in a.history] == [h["val_top1"] for h in b.history]  # seeded
    assert a.best_epoch == max(a.history, key=lambda h: (h["val_top1"], -h["val_nll"]))["epoch"]
    assert a.val_top1 == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())  # a copy was trained
    assert all(not p.requires_grad for p in model.net.parameters())
    test = _bright_dark(20, 1).with_transform(model.transform)
    with torch.no_grad():
        x = torch.stack([test[i][0] for i in range(len(test))])
        pred = a.model(x).argmax(1).numpy()
    assert (pred == test.labels).mean() == 1.0


CARDS = """
    name = "t_transfer"
    kind = "transfer_finetune"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "lfw:train"
    test = "lfw:test"
    [protocol]
    epochs = 2
    batch_size = 64
    lr = 1e-2
    warmup_epochs = 0
    hflip = true
    crop_scale = [0.6, 1.0]
    val_fraction = 0.2
"""


def test_semisup_and_transfer_kinds_end_to_end(tmp_path):
    from sklearn.model_selection import train_test_split

    d = tmp_path / "cards"
    d.mkdir()
    (d / "t.toml").write_text(textwrap.dedent(CARDS))
    semi = (textwrap.dedent(CARDS).replace("t_transfer", "t_semisup").replace("transfer_finetune", "semisup")
            .replace("lfw:train", "digits:train").replace("lfw:test", "digits:test").replace("epochs = 2", "epochs = 1")
            .replace("hflip = true", "hflip = false") + "fraction = 0.05\n")
    (d / "s.toml").write_text(semi)
    cards.add_card_dir(d)
    tr, se = evaluate(["random_micro"], ["t_transfer", "t_semisup"],
                      options=RunOptions(seeds=(1,), device="cpu", results_dir=tmp_path / "r"))
    assert isinstance(tr, ResultRecord) and isinstance(se, ResultRecord)
    assert len(tr.extras["history"]) == 2 and 1 <= tr.mean["best_epoch"] <= 2
    assert 0.0 <= tr.mean["top1"] <= 1.0 and "top5" not in tr.mean  # two classes
    from prosmin_bench.data import resolve_dataset

    y = resolve_dataset("digits:train").labels
    idx, _ = train_test_split(np.arange(len(y)), train_size=72, stratify=y, random_state=1)
    assert se.mean["n_labelled"] == 72 and se.extras["subset"]["source"] == "stratified"
    import hashlib

    digest = hashlib.sha256(np.sort(idx).astype(np.int64).tobytes()).hexdigest()[:16]
    assert se.extras["subset"]["indices_sha256"] == digest
    assert set(se.mean) >= {"top1", "top5", "nll", "ece", "val_top1", "best_epoch", "n_labelled"}
