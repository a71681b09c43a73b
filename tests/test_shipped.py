"""The micro checkpoints shipped in the package (prosmin_bench/models/shipped.py): current with their recipes,
used only where no checkpoint was made here, and re-made by the pretraining module with the same metrics."""

import json

import pytest
import torch

from prosmin_bench import suite
from prosmin_bench.models import get_model, get_model_spec
from prosmin_bench.models.checkpoints import check_format, interrupted_at
from prosmin_bench.models.shipped import SHIPPED_RECIPES, cut, shipped_checkpoint
from prosmin_bench.models.zoo import catalogue
from prosmin_bench.paths import recipe_checkpoint_path
from prosmin_bench.pretrain import pretrain, resolve_config
from prosmin_bench.pretrain.train import config_differences
from prosmin_bench.runner import RunOptions, evaluate


def test_every_recipe_model_of_the_mini_suite_has_a_shipped_checkpoint():
    recipes = {s.weights.recipe for _, s in catalogue().items() if s.scale == "mini" and s.weights.recipe}
    assert recipes == set(SHIPPED_RECIPES)


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES)
def test_shipped_checkpoint_is_a_finished_run_of_the_recipe_as_defined_now(recipe):
    path = shipped_checkpoint(recipe)
    assert path is not None, f"prosmin_bench/_checkpoints/{recipe}.pt is missing"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    check_format(ckpt)
    assert interrupted_at(ckpt) is None
    assert "optimizer" not in ckpt and ckpt["shipped"]["made_by"] == f"prosmin-bench pretrain --recipe {recipe}"
    # A recipe changed without remaking its checkpoint (models/shipped.py says how) fails here.
    assert config_differences(ckpt["config"], resolve_config(recipe).to_dict()) == []


def test_a_fresh_home_evaluates_the_shipped_checkpoints_without_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path))
    monkeypatch.setattr(suite, "pretrain", lambda *a, **k: pytest.fail("pretrained although a checkpoint ships"))
    for name in ("prosmin_micro", "prosmin_target_micro", "dino_micro"):
        spec = get_model_spec(name)
        suite.ensure_weights(spec, RunOptions())
        model = get_model(spec)
        assert model.weights_path == str(shipped_checkpoint(spec.weights.recipe))
    assert get_model("prosmin_target_micro").network == "target" and get_model("prosmin_micro").network == "online"
    assert get_model("prosmin_micro").has_predictive


def test_a_checkpoint_made_here_wins_and_no_shipped_pretrains(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(suite, "pretrain", lambda recipe, **k: calls.append(recipe))
    spec = get_model_spec("mocov3_micro")
    suite.ensure_weights(spec, RunOptions(shipped=False))
    assert calls == ["mocov3_micro"]  # --no-shipped: made here
    home = recipe_checkpoint_path("mocov3_micro")
    cut(shipped_checkpoint("mocov3_micro"), home)  # stands for one made by `prosmin-bench pretrain`
    assert get_model(spec).weights_path == str(home)


def test_the_pretraining_module_remakes_a_shipped_checkpoint(tmp_path, monkeypatch):
    """Re-pretrain mocov3_micro (the cheapest recipe, 308 steps) and compare its k-NN metrics with the shipped
    checkpoint's. Floating point differs across CPUs, so the weights need not be equal; the accuracy must agree."""
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / "home"))
    remade = pretrain("mocov3_micro", out_dir=tmp_path / "remade")
    scores = {}
    for label, weights in (("shipped", None), ("remade", str(remade))):
        opts = RunOptions(seeds=(0,), results_dir=tmp_path / label, weights=weights, pretrain_missing=False)
        (rec,) = evaluate("mocov3_micro", "digits_knn", options=opts)
        assert rec.record_type == "result"
        scores[label] = rec.mean
    print(json.dumps(scores))
    for metric in ("top1_k10", "top1_k20", "top1_k100"):
        assert abs(scores["shipped"][metric] - scores["remade"][metric]) <= 0.03, (metric, scores)
    assert abs(scores["shipped"]["nll_k20"] - scores["remade"]["nll_k20"]) <= 0.1, scores
