"""Hyper-parameter selection that never ends on the grid's edge (issue 17): the log-spaced extension itself, the
linear probe's lr and the low-shot lambda on constructed problems whose optimum lies far outside the card's grid,
the hard bounds that stop a plateau, the per-seed ``extras["selection"]``, and the head cache."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from prosmin_bench.data.base import DatasetRef
from prosmin_bench.errors import CardError, DataError
from prosmin_bench.settings import EvalSettings
from prosmin_bench.tasks import probes
from prosmin_bench.tasks.base import TaskContext, TaskSpec, build_task
from prosmin_bench.tasks.probes import LinearParams, fit_linear_probe
from prosmin_bench.tasks.selection import MAX_EXTENSION, Score, select_on_grid

TRAIN = DatasetRef.parse("digits:train")


# ---------------------------------------------------------------------------------------------- the extension rule
def _recording(fn):
    calls = []

    def evaluate(v):
        calls.append(v)
        return fn(v)

    return evaluate, calls


def test_optimum_far_above_the_grid_is_reached_by_log_spaced_steps():
    # held-out NLL |log(v / 500)|: best at 500, 50x above the grid's top
    evaluate, calls = _recording(lambda v: Score(0.5, abs(math.log(v / 500.0))))
    sel = select_on_grid([1.0, 3.0, 10.0], evaluate, (1e-5, 1e4))
    # the top ratio is 10 / 3, so the new points are 10 * (10/3)^i: 33.3, 111, 370, 1235; 370 is interior
    assert calls[:3] == [1.0, 3.0, 10.0]
    assert calls[3:] == pytest.approx([10 * (10 / 3) ** i for i in (1, 2, 3, 4)])
    assert sel.chosen == pytest.approx(10 * (10 / 3) ** 3) and not sel.edge
    assert sel.grid == sorted(calls) and sel.as_extras()["grid"] == sorted(calls)


def test_optimum_far_below_the_grid_is_reached_and_the_bottom_ratio_is_used():
    evaluate, calls = _recording(lambda v: Score(0.5, abs(math.log(v / 2e-4))))
    sel = select_on_grid([0.01, 0.1, 1.0, 3.0], evaluate, (1e-7, 1e3))
    assert calls[4:] == pytest.approx([1e-3, 1e-4, 1e-5])  # ratio 0.1 / 0.01 = 10
    assert sel.chosen == pytest.approx(1e-4) and not sel.edge
    assert sel.as_extras() == {"grid": sorted(calls), "chosen": sel.chosen, "edge": False}


def test_a_score_improving_forever_stops_at_the_hard_bound_and_is_flagged():
    # top-1 on a plateau, NLL falling without end towards large values: only the bound stops it
    evaluate, calls = _recording(lambda v: Score(1.0, 1.0 / v))
    sel = select_on_grid([1.0, 3.0], evaluate, (0.5, 100.0))
    assert calls == pytest.approx([1.0, 3.0, 9.0, 27.0, 81.0, 100.0])  # the last step is clamped to the bound
    assert sel.chosen == 100.0 and sel.edge


def test_an_exact_plateau_stops_after_one_step_with_an_interior_choice():
    # every value scores the same: the first evaluated wins ties, so the extension point never replaces the edge
    evaluate, calls = _recording(lambda v: Score(0.7, 0.9))
    sel = select_on_grid([0.1, 1.0], evaluate, (1e-5, 100.0))
    assert calls == [0.1, 1.0, 0.01] and sel.chosen == 0.1 and not sel.edge


def test_ties_go_to_the_first_value_in_card_order_and_top1_outranks_nll():
    sel = select_on_grid([3.0, 1.0, 10.0], lambda v: Score(0.5, 1.0), (0.1, 100.0))
    assert sel.chosen == 3.0 and sel.grid == [1.0, 3.0, 10.0]
    scores = {1.0: Score(0.5, 0.1), 3.0: Score(0.6, 5.0), 10.0: Score(0.5, 0.2)}
    assert select_on_grid([1.0, 3.0, 10.0], scores.get, (0.01, 1000.0)).chosen == 3.0  # top-1 first, then NLL


def test_a_diverged_point_loses_and_ends_the_extension():
    # the head diverges above 20 (NaN scores); the best finite value is the old edge, now interior
    evaluate, calls = _recording(lambda v: Score(float("nan"), float("nan")) if v > 20 else Score(0.9, 1.0 / v))
    sel = select_on_grid([1.0, 10.0], evaluate, (1e-3, 1e6))
    assert calls == [1.0, 10.0, 100.0] and sel.chosen == 10.0 and not sel.edge


def test_a_one_value_grid_is_a_fixed_choice_and_the_extension_count_is_capped():
    evaluate, calls = _recording(lambda v: Score(1.0, 1.0 / v))
    sel = select_on_grid([0.1], evaluate, (1e-5, 100.0))
    assert calls == [0.1] and sel.chosen == 0.1 and not sel.edge
    sel = select_on_grid([1.0, 1.01], lambda v: Score(1.0, 1.0 / v), (0.5, 1e9))  # ratio 1.01 would crawl
    assert len(sel.grid) == 2 + MAX_EXTENSION and sel.edge
    with pytest.raises(ValueError, match="within the bounds"):
        select_on_grid([1e-6, 1.0], evaluate, (1e-5, 100.0))


# -------------------------------------------------------------------------------------------- the linear probe
def _ctx(sets, seed=0):
    model = SimpleNamespace(spec=SimpleNamespace(feature_layer="cls"), has_predictive=False)
    return TaskContext(model=model, seed=seed, settings=EvalSettings(),
                       feature_fn=lambda ref, layer, preprocess=None: sets[ref.split],
                       dataset_fn=lambda ref: SimpleNamespace())


def _blobs(n, dim, classes, scale, seed, *, spread=1.0, noise_seed=None):
    """Gaussian blobs: class centres N(0, spread^2) (from ``seed``), unit noise (from ``noise_seed``), x ``scale``."""
    centers = np.random.default_rng(seed).normal(size=(classes, dim)) * spread
    y = np.repeat(np.arange(classes), n // classes)
    noise = np.random.default_rng(seed if noise_seed is None else noise_seed).normal(size=(len(y), dim))
    x = (centers[y] + noise) * scale
    return x.astype(np.float32), y


def _feature_set(x, y, key):
    return SimpleNamespace(features=x, labels=y, key=key)


def test_linear_lr_far_above_the_grid_is_found(monkeypatch):
    """Features scaled down by 0.3 and only 10 epochs: a head at the card's lrs (0.01, 0.03) barely leaves its
    initialisation; the extension climbs to an interior lr 27x above the grid's top that beats both card values."""
    x, y = _blobs(300, 8, 3, 0.3, seed=0)
    ctx = _ctx({"train": _feature_set(x, y, "lin-a")})
    params = LinearParams(layer="cls", epochs=10, batch_size=64, base_lrs=(0.01, 0.03), val_fraction=0.2)
    head = fit_linear_probe(ctx, TRAIN, params)
    sel = head.selection
    assert not sel["edge"] and sel["chosen"] == head.lr and head.lr > 20 * 0.03
    grid = sel["grid"]
    assert grid == sorted(grid) and grid[:2] == [0.01, 0.03] and grid.index(head.lr) not in (0, len(grid) - 1)
    ratios = np.array(grid[1:]) / np.array(grid[:-1])
    assert ratios == pytest.approx(np.full(len(ratios), 3.0))  # log-spaced with the card's top ratio
    top1 = [v["top1"] for _, v in sorted((float(k), v) for k, v in head.val_scores.items())]  # in grid order
    assert len(top1) == len(grid) and top1[grid.index(head.lr)] == head.val_top1 == max(top1)
    assert head.val_top1 > max(top1[0], top1[1])  # better than anything on the card's grid


def test_linear_lr_plateau_stops_at_lr_bounds_and_is_flagged():
    """Features scaled down by 0.05 and 5 epochs: every larger lr is better, and lr_bounds (here 1.0) ends the
    climb."""
    x, y = _blobs(120, 8, 3, 0.05, seed=0)
    ctx = _ctx({"train": _feature_set(x, y, "lin-b")})
    params = LinearParams(layer="cls", epochs=5, batch_size=64, base_lrs=(0.01, 0.1), val_fraction=0.2,
                          lr_bounds=(1e-5, 1.0))
    head = fit_linear_probe(ctx, TRAIN, params)
    assert head.selection == {"grid": [0.01, 0.1, 1.0], "chosen": 1.0, "edge": True}


def test_a_cached_head_gives_the_same_record_and_the_key_covers_the_params(monkeypatch):
    x, y = _blobs(240, 8, 3, 0.3, seed=2)
    xt, yt = _blobs(90, 8, 3, 0.3, seed=2, noise_seed=20)
    sets = {"train": _feature_set(x, y, "lin-c"), "test": _feature_set(xt, yt, "lin-c-test")}
    spec = TaskSpec(name="sel_linear", kind="linear", version=1, main_score="top1", suite="mini",
                    datasets={"train": "digits:train", "test": "digits:test"},
                    protocol={"layer": "cls", "epochs": 5, "batch_size": 64, "base_lrs": [0.1, 0.3]})
    task = build_task(spec)
    first = task.run(_ctx(sets))

    def no_training(*a, **k):
        raise AssertionError("a cached head was trained again")

    with monkeypatch.context() as mp:
        mp.setattr(probes, "train_linear_head", no_training)
        again = task.run(_ctx(sets))
    assert again.metrics == first.metrics
    assert again.extras["selection"] == first.extras["selection"] and again.extras["val_scores"] == first.extras[
        "val_scores"]
    assert {"nll_ts", "ece_ts", "temperature"} <= set(first.metrics)
    sel = first.extras["selection"]["lr"]
    assert set(sel) == {"grid", "chosen", "edge"} and sel["chosen"] == first.metrics["lr"]
    # another bound, another head: the key covers every param
    wider = build_task(TaskSpec(**{**vars(spec), "refs": {}, "protocol": {**spec.protocol, "lr_bounds": [1e-4, 50.0]}}))
    calls = []
    with monkeypatch.context() as mp:
        real = probes.train_linear_head
        mp.setattr(probes, "train_linear_head", lambda *a, **k: calls.append(1) or real(*a, **k))
        wider.run(_ctx(sets))
    assert calls


def test_linear_head_on_a_class_subset_is_the_head_of_the_filtered_set():
    """classes=[2, 0]: trained on the images of classes 2 and 0 only, labels 0 and 1 in that order; the same
    weights as a head fitted to that filtered set given directly."""
    x, y = _blobs(300, 8, 4, 0.5, seed=3)
    params = LinearParams(layer="cls", epochs=5, batch_size=64, base_lrs=(0.1, 0.3), val_fraction=0.2)
    sub = fit_linear_probe(_ctx({"train": _feature_set(x, y, "lin-d")}), TRAIN, params, 4, classes=[2, 0])
    keep = np.isin(y, [2, 0])
    y_direct = np.where(y[keep] == 2, 0, 1)
    direct = fit_linear_probe(_ctx({"train": _feature_set(x[keep], y_direct, "lin-d-filtered")}), TRAIN, params)
    assert sub.num_classes == 2 and sub.head.out_features == 2
    assert np.array_equal(sub.head.weight.detach().numpy(), direct.head.weight.detach().numpy())
    assert sub.lr == direct.lr and sub.selection == direct.selection
    with pytest.raises(DataError, match=r"Classes \[7\] have no training image"):
        fit_linear_probe(_ctx({"train": _feature_set(x, y, "lin-d")}), TRAIN, params, classes=[0, 7])


@pytest.mark.parametrize("protocol,match", [
    ({"base_lrs": [0.1, 1.0], "lr_bounds": [0.2, 10.0]}, r"'base_lrs' has \[0.1\] outside lr_bounds"),
    ({"lr_bounds": [1.0, 0.5]}, "'lr_bounds' must be"),
])
def test_linear_cards_with_unusable_bounds_are_refused(protocol, match):
    spec = TaskSpec(name="bad_linear", kind="linear", version=1, main_score="top1", suite="mini",
                    datasets={"train": "digits:train", "test": "digits:test"}, protocol=protocol)
    with pytest.raises(CardError, match=match):
        build_task(spec)


# ---------------------------------------------------------------------------------------------- low-shot lambda
def _lowshot(protocol, sets):
    spec = TaskSpec(name="sel_lowshot", kind="lowshot", version=1, main_score="top1", suite="mini",
                    datasets={"train": "digits:train", "test": "digits:test"},
                    protocol={"fraction": 0.25, "lambdas_over_n": [], **protocol})
    return build_task(spec).run(_ctx(sets))


def _lowshot_sets(dim, spread, seed, label_noise=0.0):
    """400 train / 200 test images of 4 blobs; ``label_noise`` of the train labels moved to the next class."""
    x, y = _blobs(400, dim, 4, 1.0, seed=seed, spread=spread)
    y = np.where(np.random.default_rng(seed + 7).random(len(y)) < label_noise, (y + 1) % 4, y)
    test = _blobs(200, dim, 4, 1.0, seed=seed, spread=spread, noise_seed=seed + 100)
    return {"train": _feature_set(x, y, f"low-{seed}-{label_noise}"), "test": _feature_set(*test, f"low-{seed}-t")}


def test_lowshot_lambda_far_below_the_grid_is_found():
    """Separated blobs with 10% of the labels moved: the held-out top-1 is the same for every lambda (the moved
    labels are always wrong), the card's lambdas (10, 100) give near-uniform probabilities, and too small a lambda
    is over-confident on the moved labels, so the held-out NLL is best three to four decades below the grid."""
    out = _lowshot({"lambdas": [10.0, 100.0]}, _lowshot_sets(16, 3.0, 1, label_noise=0.1))
    sel = out.extras["selection"]["lambda"]
    assert not sel["edge"] and sel["chosen"] <= 1e-2
    grid = sel["grid"]
    assert grid[-2:] == [10.0, 100.0] and grid.index(sel["chosen"]) not in (0, len(grid) - 1)
    assert np.diff(np.log10(grid)) == pytest.approx(np.ones(len(grid) - 1))  # ratio 100 / 10 downwards
    assert out.metrics["lambda"] == sel["chosen"]  # no lambda/N entry: refit with the value itself
    scores = {float(k): v for k, v in out.extras["val_scores"].items()}
    assert scores[sel["chosen"]]["top1"] == max(v["top1"] for v in scores.values())
    assert scores[sel["chosen"]]["nll"] < min(scores[10.0]["nll"], scores[100.0]["nll"]) - 0.5


def test_lowshot_plateau_on_separable_data_stops_at_lambda_bounds():
    """Well separated classes: held-out top-1 stays 1 and the NLL keeps falling as lambda -> 0; the bound stops it."""
    out = _lowshot({"lambdas": [0.1, 1.0], "lambda_bounds": [1e-4, 1e3]}, _lowshot_sets(16, 3.0, 1))
    sel = out.extras["selection"]["lambda"]
    assert sel == {"grid": [1e-4, 1e-3, 0.01, 0.1, 1.0], "chosen": 1e-4, "edge": True}
    assert out.metrics["val_top1"] == 1.0


def test_lowshot_extension_of_a_lambda_over_n_entry_stays_one():
    """The DINO entry 0.1/N extended downwards: the new points are c/N entries too, so the refit uses c / N_all."""
    out = _lowshot({"lambdas": [], "lambdas_over_n": [0.1, 1.0], "lambda_bounds": [1e-6, 1e3]},
                   _lowshot_sets(16, 3.0, 1))
    sel = out.extras["selection"]["lambda"]
    n_fit, n_all = 80, 100  # 25 of 400 per class drawn, 20% of each class held out
    assert out.metrics["n_labelled"] == n_all
    assert sel["chosen"] < 0.1 / n_fit and out.extras["lambda_choice"].endswith("/N")
    coefficient = float(out.extras["lambda_choice"][:-2])
    assert sel["chosen"] == pytest.approx(coefficient / n_fit, rel=1e-9)
    assert out.metrics["lambda"] == pytest.approx(coefficient / n_all, rel=1e-9)


def test_a_standardised_head_equals_a_head_trained_on_z_scored_features_and_takes_raw_features():
    """``standardise``: the folded head on raw features gives the logits of a head trained (same seed and schedule)
    on features z-scored in the test with numpy (MAE's BatchNorm1d(affine=False) in front of the head)."""
    from prosmin_bench.tasks.probes import predict_logits, train_linear_head

    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    x = (rng.normal(size=(300, 12)) * rng.uniform(0.01, 5.0, 12) + rng.normal(size=12) * 20).astype(np.float32)
    x[:, 3] = 7.0  # a constant dimension: std 1, so it contributes nothing after centring
    z = (x.astype(np.float64) - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    kw = dict(lr=0.1, epochs=5, batch_size=64, momentum=0.9, weight_decay=0.0, seed=0)
    folded = train_linear_head(x, y, 4, standardise=True, **kw)
    direct = train_linear_head(z.astype(np.float32), y, 4, **kw)
    np.testing.assert_allclose(predict_logits(folded, x), predict_logits(direct, z.astype(np.float32)),
                               rtol=1e-4, atol=1e-4)
    plain = train_linear_head(x, y, 4, **kw)
    assert not np.allclose(predict_logits(plain, x), predict_logits(direct, z.astype(np.float32)), atol=1e-2)
