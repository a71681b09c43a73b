"""The augmented linear probe (kind ``linear_aug``, DINO's eval_linear.py): its train transform against torchvision's
objects seeded identically, the one-pass multi-head training against a head trained alone, a 2-process gloo run
(torchrun, as a user would) against one process, held-out selection blind to the test labels, card checks and a run
end to end; the view memo (``tasks/view_memo.py``): the same numbers with it and without it (budget 0), and the
backbone run only on the views no earlier pass computed, counted by wrapping its forward.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node=2 tests/test_tasks_linear_aug.py
OUT`` trains the heads on every rank and saves rank 0's to ``OUT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from prosmin_bench import cards
from prosmin_bench.errors import CardError
from prosmin_bench.models import Preprocess
from prosmin_bench.tasks.base import TaskContext, TaskSpec, build_task
from prosmin_bench.tasks.linear_aug import LinearAugParams, SeededAugmented, item_seed, train_heads, train_transform
from prosmin_bench.tasks.view_memo import ViewMemo

REPO = Path(__file__).resolve().parents[1]
N_SMALL = 100  # training images of the small runs (10 per class)
SMALL = dict(epochs=2, batch_size=32, crop_scale=(0.6, 1.0), hflip=True)


def _fake_model(crop: int = 24, interpolation: str = "bicubic") -> SimpleNamespace:
    pre = Preprocess(resize=None, crop=crop, interpolation=interpolation, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    return SimpleNamespace(spec=SimpleNamespace(preprocess=pre))


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8))


@pytest.mark.parametrize("hflip,interp", [(True, "bilinear"), (False, "bicubic")])
def test_train_transform_is_torchvisions_pipeline_seeded_identically(hflip, interp):
    model = _fake_model()
    p = LinearAugParams(crop_scale=(0.2, 0.9), hflip=hflip, interpolation=interp)
    ours = train_transform(model, p)
    ops = [T.RandomResizedCrop(24, scale=(0.2, 0.9), interpolation=T.InterpolationMode(interp))]
    ops += [T.RandomHorizontalFlip()] if hflip else []
    ref = T.Compose(ops + [T.ToTensor(), T.Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))])
    img = _image()
    outs = set()
    for seed in range(8):
        torch.manual_seed(seed)
        a = ours(img)
        torch.manual_seed(seed)
        b = ref(img)
        assert a.shape == (3, 24, 24) and torch.equal(a, b)
        outs.add(a.sum().item())
    assert len(outs) > 1  # the seeds do draw different crops


def test_each_image_is_augmented_from_its_own_seed_leaving_the_callers_rng_alone():
    from prosmin_bench.data.base import ArrayImageDataset

    rng = np.random.default_rng(0)
    ds = ArrayImageDataset(rng.integers(0, 256, (6, 30, 30, 3), dtype=np.uint8), [0, 1, 2, 0, 1, 2], ["a", "b", "c"],
                           "toy")
    p = LinearAugParams(crop_scale=(0.3, 1.0))
    ref = train_transform(_fake_model(), p)
    items = SeededAugmented(ds, np.array([4, 1]), train_transform(_fake_model(), p), seed=3)
    items.epoch = 2
    torch.manual_seed(123)
    before = torch.get_rng_state()
    x, y = items[0]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(item_seed(3, 2, 4))
    assert y == 1 and torch.equal(x, ref(ds.get_image(4)))
    items.epoch = 3
    assert not torch.equal(items[0][0], x)  # a new draw each epoch


def _small_digits(n_per_class: int = 10):
    from prosmin_bench.data import resolve_dataset
    from prosmin_bench.data.subsets import SubsetImageDataset

    full = resolve_dataset("digits:train")
    y = np.asarray(full.labels)
    idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in range(10)]))
    return SubsetImageDataset(full, idx)


@pytest.fixture(scope="module")
def micro():
    from prosmin_bench.models import get_model, get_model_spec

    return get_model(get_model_spec("random_micro"), device=torch.device("cpu"))


def test_heads_trained_together_equal_each_head_trained_alone(micro):
    ds = _small_digits()
    p = LinearAugParams(**SMALL)
    idx = np.arange(len(ds))
    stats = (torch.randn(micro.layer_dim(p.layer)) * 0.1, torch.rand(micro.layer_dim(p.layer)) + 0.5)
    together = train_heads(micro, ds, idx, [0.05, 0.5, 5.0], 10, p, seed=1, device=torch.device("cpu"), stats=stats)
    alone = train_heads(micro, ds, idx, [0.5], 10, p, seed=1, device=torch.device("cpu"), stats=stats)
    torch.testing.assert_close(together[0.5].weight, alone[0.5].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(together[0.5].bias, alone[0.5].bias, atol=1e-6, rtol=0)
    assert not torch.allclose(together[0.05].weight, together[0.5].weight)  # each head has its own lr


def _ctx(model, train, test, seed: int = 0, settings=None) -> TaskContext:
    """A task context on the given datasets, features computed directly (no cache) under the eval transform."""
    from prosmin_bench.settings import EvalSettings

    sets = {"digits:train": train, "digits:test": test}

    def feature_fn(ref, layer, preprocess=None):
        ds = sets[ref.raw]
        with torch.no_grad():
            x = torch.stack([model.transform(ds.get_image(i)) for i in range(len(ds))])
            feats = model.features(x, layer).numpy()
        return SimpleNamespace(features=feats, labels=np.asarray(ds.labels))

    return TaskContext(model=model, seed=seed, settings=settings or EvalSettings(), feature_fn=feature_fn,
                       dataset_fn=lambda ref: sets[ref.raw])


def _spec(**protocol) -> TaskSpec:
    return TaskSpec(name="t_aug", kind="linear_aug", version=1, main_score="top1", suite="mini",
                    datasets={"train": "digits:train", "test": "digits:test"}, protocol=protocol, card="t_aug.toml")


def test_the_lr_is_chosen_without_the_test_labels(micro):
    from prosmin_bench.data.subsets import SubsetImageDataset

    train = _small_digits()
    test = _small_digits(3)
    shuffled = SubsetImageDataset(test.base, test.indices)
    shuffled.labels = np.random.default_rng(0).permutation(test.labels)
    task = build_task(_spec(epochs=1, batch_size=32, base_lrs=[0.1, 1.0], lr_bounds=[0.1, 1.0], crop_scale=[0.6, 1.0],
                            standardise=True))
    a = task.run(_ctx(micro, train, test))
    b = task.run(_ctx(micro, train, shuffled))
    assert a.extras["selection"] == b.extras["selection"] and a.extras["val_scores"] == b.extras["val_scores"]
    assert a.metrics["lr"] == b.metrics["lr"] and a.metrics["val_top1"] == b.metrics["val_top1"]
    assert a.metrics["top1"] != b.metrics["top1"]  # the test labels do reach the test metrics
    assert set(a.metrics) == {"top1", "top5", "nll", "ece", "nll_ts", "ece_ts", "temperature", "val_top1", "lr"}
    assert a.samples.values.shape[-1] == len(test)


# --- the view memo: later passes read the first pass's backbone features of the same views -----------------------


def _counting(model, monkeypatch) -> list[int]:
    """Wrap ``model.features`` (the instance's): the list gets the batch size of every forward."""
    sizes: list[int] = []
    forward = model.features

    def features(x, layer):
        sizes.append(len(x))
        return forward(x, layer)

    monkeypatch.setattr(model, "features", features)
    return sizes


# Two tiny lrs: whichever wins is an edge of the grid, so at least one extension pass over the fit part runs.
MEMO_PROTOCOL = dict(epochs=2, batch_size=16, base_lrs=[1e-4, 2e-4], lr_bounds=[5e-5, 4e-4], crop_scale=[0.6, 1.0],
                     standardise=True)


def test_the_view_memo_changes_no_number_and_runs_the_backbone_only_on_new_views(micro, monkeypatch):
    from prosmin_bench.settings import EvalSettings
    from prosmin_bench.tasks.probes import stratified_holdout

    train, test = _small_digits(), _small_digits(3)
    epochs, n = MEMO_PROTOCOL["epochs"], len(train)
    n_fit = len(stratified_holdout(np.asarray(train.labels), 0.1, 0)[0])
    one_epoch = n_fit * micro.layer_dim("cls_last4") * 4 + n * 8  # float32 rows of the fit part + index map
    task = build_task(_spec(**MEMO_PROTOCOL))
    sizes = _counting(micro, monkeypatch)
    outs, views = {}, {}
    for budget in (0, one_epoch, 1 << 30):
        sizes.clear()
        outs[budget] = task.run(_ctx(micro, train, test, settings=EvalSettings(max_memory=budget)))
        views[budget] = sum(sizes) - n - len(test)  # less the centre-crop features of train and test
    off = outs[0]
    n_ext = len(off.extras["selection"]["lr"]["grid"]) - 2
    assert n_ext >= 1
    for budget, out in outs.items():  # the same numbers, float for float
        assert out.metrics == off.metrics, budget
        assert out.extras["selection"] == off.extras["selection"]
        assert out.extras["val_scores"] == off.extras["val_scores"]
        np.testing.assert_array_equal(out.samples.values, off.samples.values)
    # backbone views: the fit pass, the extension passes and the final pass over all of train, each `epochs` times
    assert views[0] == epochs * (n_fit * (1 + n_ext) + n)
    assert views[one_epoch] == epochs * n_fit + (epochs - 1) * n_fit * (n_ext + 1) + epochs * (n - n_fit)
    assert views[1 << 30] == epochs * n  # every view once
    assert [outs[b].extras["augmentation"]["feature_memo"]["epochs"] for b in outs] == [[], [0], [0, 1]]


def test_a_torchrun_follower_keeps_its_view_memo_from_pass_to_pass_of_a_run(micro, monkeypatch):
    from dataclasses import asdict

    from prosmin_bench.settings import EvalSettings
    from prosmin_bench.tasks import linear_aug

    ds = _small_digits(3)
    source = SimpleNamespace(model=micro, settings=EvalSettings(), dataset=lambda ref: ds)
    params = asdict(LinearAugParams(**{**SMALL, "batch_size": 8}))

    def message(n: int, token: str, last: bool):
        return (linear_aug.SERVE_MESSAGE, {"train_ref": "digits:train", "indices": np.arange(n), "lrs": [0.1],
                                           "num_classes": 10, "params": params, "seed": 0, "stats": None,
                                           "memo": {"token": token, "last": last}})

    sizes = _counting(micro, monkeypatch)
    linear_aug.serve(source, message(10, "old", False))  # a run that ended early: its memo goes at the next run
    linear_aug.serve(source, message(20, "run", False))
    assert list(linear_aug._FOLLOWER_MEMO) == ["run"]
    sizes.clear()
    linear_aug.serve(source, message(30, "run", True))
    assert sum(sizes) == 2 * 10  # 2 epochs of the 10 images the first pass of the run did not see
    assert linear_aug._FOLLOWER_MEMO == {}  # dropped after the run's last pass


def test_a_view_memo_serves_one_run_only():
    memo = ViewMemo(1 << 20)
    memo.bind((0, "cls_last4"))
    with pytest.raises(ValueError, match="Expected the views of"):
        memo.bind((1, "cls_last4"))
    with pytest.raises(ValueError, match="budget"):
        ViewMemo(-1)


@pytest.mark.parametrize("field,value", [("crop_scale", [0.5, 1.5]), ("base_lrs", [0.1, -1.0]), ("hflip", "yes"),
                                         ("interpolation", "cubic"), ("val_fraction", 1.0), ("epoch", 3)])
def test_a_bad_protocol_field_is_a_card_error_naming_it(field, value):
    with pytest.raises(CardError, match=field):
        build_task(_spec(**{field: value}))


def test_shipped_cards_hold_dinos_values_and_name_their_base_task():
    from prosmin_bench.tasks import get_task_spec

    spec = get_task_spec("imagenet_linear_aug")
    p = build_task(spec).params
    assert (p.layer, p.epochs, p.batch_size, p.crop_scale, p.hflip, p.momentum, p.weight_decay) == \
        ("cls_last4", 100, 1024, (0.08, 1.0), True, 0.9, 0.0)
    assert p.base_lrs == build_task(get_task_spec("imagenet_linear")).params.base_lrs
    mini = get_task_spec("digits_linear_aug")
    assert mini.suite == "mini" and build_task(mini).params.hflip is False
    assert getattr(spec, "variant_of", "imagenet_linear") == "imagenet_linear"
    assert getattr(mini, "variant_of", "digits_linear") == "digits_linear"


CARD = """
    name = "t_linear_aug"
    kind = "linear_aug"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    epochs = 1
    batch_size = 128
    base_lrs = [0.3, 1.0]
    lr_bounds = [0.3, 1.0]
    crop_scale = [0.6, 1.0]
    hflip = false
    standardise = true
"""


def test_runs_end_to_end_and_the_record_states_the_augmentation(tmp_path):
    from prosmin_bench.results import ResultRecord
    from prosmin_bench.runner import RunOptions, evaluate

    (tmp_path / "t.toml").write_text(textwrap.dedent(CARD))
    cards.add_card_dir(tmp_path)
    (rec,) = evaluate(["random_micro"], ["t_linear_aug"],
                      options=RunOptions(seeds=(0,), device="cpu", results_dir=tmp_path / "r"))
    assert isinstance(rec, ResultRecord), getattr(rec, "message", rec)
    assert 0.0 <= rec.mean["top1"] <= 1.0 and rec.mean["lr"] in (0.3, 1.0) and rec.ci95 is not None
    assert list(rec.protocol["crop_scale"]) == [0.6, 1.0] and rec.protocol["hflip"] is False
    aug = rec.extras["augmentation"]
    assert aug["crop_scale"] == [0.6, 1.0] and aug["hflip"] is False
    assert aug["train_transform"][0].startswith("RandomResizedCrop(size=(32, 32), scale=(0.6, 1.0)")
    assert not any("Flip" in op for op in aug["train_transform"])
    assert rec.extras["selection"]["lr"]["grid"] == [0.3, 1.0]
    assert set(rec.extras["val_scores"]) == {"0.3", "1"}


# --- torchrun: two processes on gloo against one ----------------------------------------------------------------


def worker(out: Path) -> None:
    from prosmin_bench import distributed
    from prosmin_bench.models import get_model, get_model_spec

    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    model = get_model(get_model_spec("random_micro"), device=torch.device("cpu"))
    ds = _small_digits(5)
    heads = train_heads(model, ds, np.arange(len(ds)), [0.1, 1.0], 10, LinearAugParams(**{**SMALL, "batch_size": 16}),
                        seed=2, device=torch.device("cpu"), stats=None)
    torch.save({lr: h.state_dict() for lr, h in heads.items()}, out / f"rank{distributed.rank()}.pt")
    # with a view memo: a pass over 40 images, then one over all 50 reading the first pass's views of this rank
    memo, p = ViewMemo(1 << 20), LinearAugParams(**{**SMALL, "batch_size": 16})
    train_heads(model, ds, np.arange(40), [0.1], 10, p, seed=2, device=torch.device("cpu"), stats=None, memo=memo)
    (head,) = train_heads(model, ds, np.arange(50), [0.1], 10, p, seed=2, device=torch.device("cpu"), stats=None,
                          memo=memo, keep=False).values()
    torch.save({"head": head.state_dict(), "reused": memo.reused}, out / f"memo{distributed.rank()}.pt")
    distributed.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_trains_the_heads_one_process_trains(tmp_path, micro):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__)), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    ds = _small_digits(5)  # 50 images: shards of 25, batches of 8 per rank = the single process's 16
    single = train_heads(micro, ds, np.arange(len(ds)), [0.1, 1.0], 10, LinearAugParams(**{**SMALL, "batch_size": 16}),
                         seed=2, device=torch.device("cpu"), stats=None)
    for lr, head in single.items():
        for k, v in head.state_dict().items():
            assert torch.equal(ranks[0][lr][k], ranks[1][lr][k]), (lr, k)
            torch.testing.assert_close(ranks[0][lr][k], v, atol=1e-6, rtol=1e-5)
    # each rank's memo holds its own shard's views: the second pass (2 epochs x 25 per rank) finds some, not all
    memos = [torch.load(tmp_path / f"memo{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(0 < m["reused"] < 50 for m in memos), [m["reused"] for m in memos]
    for k, v in single[0.1].state_dict().items():
        assert torch.equal(memos[0]["head"][k], memos[1]["head"][k]), k
        torch.testing.assert_close(memos[0]["head"][k], v, atol=1e-6, rtol=1e-5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
