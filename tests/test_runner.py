"""The run loop: results written, reused, resumed; features cached; errors isolated; one-line CLI errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import prosmin_bench
from prosmin_bench import cards, features
from prosmin_bench.cli import main
from prosmin_bench.paths import record_path
from prosmin_bench.results import ErrorRecord, ResultRecord, read_record

FAST_LINEAR = """
    name = "digits_linear_fast"
    kind = "linear"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    layer = "cls_last4"
    epochs = 5
    base_lrs = [0.1, 1.0]
"""


@pytest.fixture
def fast_cards(tmp_path):
    d = tmp_path / "cards"
    d.mkdir()
    (d / "fast.toml").write_text(textwrap.dedent(FAST_LINEAR))
    cards.add_card_dir(d)
    return d


def _count_forward(monkeypatch):
    calls = []
    real = features.compute_features

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(features, "compute_features", spy)
    return calls


def test_second_run_reuses_results_and_features(tmp_path, fast_cards, monkeypatch):
    res = tmp_path / "results"
    calls = _count_forward(monkeypatch)
    recs = prosmin_bench.evaluate(["random_micro"], ["digits_knn", "digits_linear_fast"], results_dir=res)
    assert [type(r) for r in recs] == [ResultRecord, ResultRecord]
    first_calls = len(calls)
    assert first_calls == 4  # cls + cls_last4 features for train and test
    knn = read_record(record_path(res, "random_micro", "digits_knn"))
    assert knn.task_version == 2 and knn.seeds == [0] and 0 < knn.mean["top1_k20"] < 1
    assert knn.weights_sha256 == prosmin_bench.get_model("random_micro").weights_sha256
    mtime = record_path(res, "random_micro", "digits_knn").stat().st_mtime_ns
    again = prosmin_bench.evaluate(["random_micro"], ["digits_knn", "digits_linear_fast"], results_dir=res)
    assert len(calls) == first_calls  # nothing recomputed
    assert record_path(res, "random_micro", "digits_knn").stat().st_mtime_ns == mtime
    assert again[0].mean == knn.mean
    # new results folder, same cache: the tasks run again but no forward pass happens
    recs2 = prosmin_bench.evaluate(["random_micro"], ["digits_knn", "digits_linear_fast"], results_dir=tmp_path / "r2")
    assert len(calls) == first_calls and recs2[0].mean == knn.mean and recs2[1].mean == recs[1].mean
    # overwrite recomputes the record (features still come from the cache)
    prosmin_bench.evaluate(["random_micro"], ["digits_knn"], results_dir=res, overwrite=True)
    assert record_path(res, "random_micro", "digits_knn").stat().st_mtime_ns != mtime


def test_knn_record_matches_an_independent_computation(tmp_path):
    """The digits_knn top-1 equals sklearn-free direct DINO k-NN on the model's features."""
    import torch

    rec = prosmin_bench.evaluate(["random_micro"], ["digits_knn"], results_dir=tmp_path)[0]
    model = prosmin_bench.get_model("random_micro")
    from prosmin_bench.data import resolve_dataset

    def feats(ref):
        ds = resolve_dataset(ref)
        x = torch.stack([model.transform(ds.get_image(i)) for i in range(len(ds))])
        with torch.no_grad():
            return torch.nn.functional.normalize(model(x), dim=1), torch.as_tensor(ds.labels)

    (xtr, ytr), (xte, yte) = feats("digits:train"), feats("digits:test")
    sims = xte @ xtr.T
    s, i = sims.topk(20, dim=1)
    votes = torch.zeros(len(xte), 10).scatter_add_(1, ytr[i], (s / 0.07).exp())
    direct = (votes.argmax(1) == yte).double().mean().item()
    assert rec.mean["top1_k20"] == pytest.approx(direct, abs=1e-12)


def test_seeds_give_mean_and_std(tmp_path, fast_cards):
    rec = prosmin_bench.evaluate(["random_micro"], ["digits_linear_fast"], seeds=(0, 1), results_dir=tmp_path)[0]
    vals = [rec.per_seed["0"]["top1"], rec.per_seed["1"]["top1"]]
    assert rec.mean["top1"] == pytest.approx(np.mean(vals))
    assert rec.std["top1"] == pytest.approx(np.std(vals, ddof=1))
    data = json.loads(record_path(tmp_path, "random_micro", "digits_linear_fast").read_text())
    assert data["schema_version"] == 1 and data["record_type"] == "result"
    assert ResultRecord.from_dict(data).to_dict() == data  # JSON round trip


def test_a_failing_pair_writes_an_error_record_and_the_rest_runs(tmp_path):
    recs = prosmin_bench.evaluate(["prosmin_micro", "random_micro"], ["digits_knn"], results_dir=tmp_path,
                                  options=_no_pretrain())
    assert isinstance(recs[0], ErrorRecord) and "prosmin-bench pretrain --recipe prosmin_micro" in recs[0].message
    assert isinstance(recs[1], ResultRecord)
    assert isinstance(read_record(record_path(tmp_path, "prosmin_micro", "digits_knn")), ErrorRecord)


def _no_pretrain():
    from prosmin_bench.runner import RunOptions

    return RunOptions(pretrain_missing=False, shipped=False)  # no checkpoint at all: the package ships some


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    res = tmp_path / "res"
    for argv, text in [
        (["run", "--model", "random_mikro", "--task", "digits_knn"], "Unknown model 'random_mikro'; did you mean 'random_micro'"),
        (["run", "--model", "random_micro", "--task", "digits_knm"], "Unknown task 'digits_knm'; did you mean 'digits_knn'"),
        (["run", "--model", "random_micro", "--task", "digits_knn", "--weights", str(tmp_path / "x.pth")], "does not exist"),
        (["run", "--model", "random_micro", "--task", "digits_knn", "--data-root", str(tmp_path / "nodata")],
         "Data root"),
    ]:
        code = main([*argv, "--results", str(res)])
        err = capsys.readouterr().err
        assert code != 0
        assert err.count("\n") == 1 and err.startswith("prosmin-bench: error: ") and text in err, err
        assert "Traceback" not in err
        assert not res.exists() or not any(res.rglob("*.json"))


def test_cli_run_prints_its_pairs_and_debug_shows_tracebacks(tmp_path, capsys):
    res = tmp_path / "res"
    assert main(["-q", "run", "--model", "random_micro", "--task", "digits_knn", "--results", str(res)]) == 0
    out = capsys.readouterr().out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("random_micro ")]  # the console table
    assert row[:3] == ["random_micro", "digits_knn@2", "top1_k20"] and row[-3] == "computed"
    assert f"prosmin-bench leaderboard --results {res}" in out  # where the full page is
    proc = subprocess.run([sys.executable, "-m", "prosmin_bench", "--debug", "run", "--model", "nope", "--task",
                           "digits_knn", "--results", str(res)], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_checkpoint_from_a_changed_recipe_is_used_with_a_warning(caplog):
    """The default run reuses an existing micro checkpoint (never retrains or deletes it by itself), but says when
    the config saved beside it is no longer the recipe's, naming the fields; run settings are not differences."""
    import logging

    from prosmin_bench.models import get_model_spec
    from prosmin_bench.paths import recipe_checkpoint_path
    from prosmin_bench.pretrain import resolve_config
    from prosmin_bench.runner import RunOptions
    from prosmin_bench.suite import ensure_weights, recipe_differences

    path = recipe_checkpoint_path("prosmin_micro")
    path.parent.mkdir(parents=True)
    # a finished run as far as ensure_weights reads it (format, step of steps); its weights are not needed here
    torch.save({"format": "prosmin-bench/pretrain", "format_version": 1, "recipe": "prosmin_micro", "step": 5,
                "total_steps": 5, "config": resolve_config("prosmin_micro").to_dict()}, path)
    kept = path.read_bytes()
    saved = resolve_config("prosmin_micro").to_dict()
    saved["run"]["checkpoint_every_steps"] = 7  # execution only: not a difference
    (path.parent / "config.json").write_text(json.dumps(saved))
    assert recipe_differences("prosmin_micro", path) == []

    saved["method_config"]["momentum_start"] = 0.9
    saved["optim"]["epochs"] = 50
    (path.parent / "config.json").write_text(json.dumps(saved))
    expected = [f"method_config.momentum_start: 0.9 -> {resolve_config('prosmin_micro').method_config.momentum_start!r}",
                f"optim.epochs: 50 -> {resolve_config('prosmin_micro').optim.epochs!r}"]
    assert recipe_differences("prosmin_micro", path) == expected
    with caplog.at_level(logging.WARNING, logger="prosmin_bench.suite"):
        ensure_weights(get_model_spec("prosmin_micro"), RunOptions())
    assert path.read_bytes() == kept  # kept, not retrained
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "differs from recipe prosmin_micro as it is now" in warning and expected[0] in warning and expected[1] in warning
    assert "move the checkpoint's folder" in warning


def test_records_say_which_network_of_a_pretraining_checkpoint_they_evaluated(tmp_path):
    """A MoCo-v3 checkpoint is evaluated with its base (online) encoder and its records say so; a record that does
    not say (written when the target network was evaluated) is recomputed, while other methods' records, whose
    network is the target as before, stay up to date."""
    import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers the baselines' recipes)
    from prosmin_bench.pretrain import pretrain
    from prosmin_bench.runner import RunOptions, evaluate

    small = {  # two steps with narrow heads: fast; what matters is which network is loaded
        "mocov3_micro": {"method.mlp_dim": 32, "method.dim": 16},
        "dino_micro": {"method.out_dim": 32, "method.head_hidden_dim": 32, "method.head_bottleneck_dim": 16},
    }
    res, old = tmp_path / "res", "2000-01-01T00:00:00Z"
    for recipe, network in (("mocov3_micro", "online"), ("dino_micro", "target")):
        path = pretrain(recipe, epochs=1, out_dir=tmp_path / recipe, device="cpu",
                        overrides={**small[recipe], "run.max_steps": 2})
        opts = RunOptions(seeds=(0,), device="cpu", results_dir=res, weights=str(path), pretrain_missing=False)
        (rec,) = evaluate([recipe], ["digits_knn"], options=opts)
        assert rec.model_info["network"] == network
        file = record_path(res, recipe, "digits_knn")
        data = json.loads(file.read_text())
        del data["model_info"]["network"]  # as written before records said which network
        data["timestamp_utc"] = old
        file.write_text(json.dumps(data))
        evaluate([recipe], ["digits_knn"], options=opts)
        again = read_record(file)
        if network == "online":  # recomputed: the old record measured the target network
            assert again.timestamp_utc != old and again.model_info["network"] == "online"
        else:  # the target network, as before: still up to date
            assert again.timestamp_utc == old
