"""Bootstrap intervals (issue 17): ``bootstrap_ci`` and the pooled / paired versions against direct percentile
bootstraps written here (the same generator draws), constructed cases with known intervals, and every task kind's
per-sample values reproducing the main score it reports, through the record's ``ci95`` and stored ``samples``."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from prosmin_bench import cards, evaluation
from prosmin_bench.metrics import (
    MetricArgumentError, ScoreSamples, bootstrap_ci, effective_rank, paired_bootstrap_ci, pooled_bootstrap_ci,
)
from prosmin_bench.record_samples import decode, encode
from prosmin_bench.results import ResultRecord, read_record
from prosmin_bench.runner import RunOptions, evaluate
from test_tasks_corruption import small_digits_c  # noqa: F401  (fixture)


# ------------------------------------------------------------------------------------------ direct references
def percentile_interval(replicates: list[float], level: float) -> tuple[float, float]:
    """Efron & Tibshirani (1993), Sec. 13.3: the B alpha-th and B (1 - alpha)-th ordered replicates."""
    ordered = sorted(replicates)
    b, alpha = len(ordered), round((1 - level) / 2, 12)
    return ordered[math.ceil(b * alpha) - 1], ordered[math.ceil(b * (1 - alpha)) - 1]


def direct_pooled(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """Replicate b: image indices shared by all seeds, then (S > 1) seed indices; mean over drawn seeds."""
    rng = np.random.default_rng(seed)
    s, n = values.shape
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        seeds = rng.integers(0, s, s) if s > 1 else np.zeros(1, dtype=int)
        out.append(float(np.mean([values[j][idx].mean() for j in seeds])))
    return out


# ------------------------------------------------------------------------------------------ bootstrap_ci
@pytest.mark.parametrize(("n", "n_boot", "level", "seed"), [(360, 1000, 0.95, 0), (57, 200, 0.9, 7)])
def test_bootstrap_ci_is_the_direct_percentile_bootstrap(n, n_boot, level, seed):
    values = np.random.default_rng(1).random(n).round(2)
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, n, n)].mean() for _ in range(n_boot)]
    assert bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed) == percentile_interval(means, level)


def test_bootstrap_ci_covers_the_mean_about_as_often_as_its_level():
    rng = np.random.default_rng(3)
    hits = 0
    for trial in range(200):
        low, high = bootstrap_ci(rng.random(120) < 0.3, n_boot=300, seed=trial)
        hits += low <= 0.3 <= high
    assert 0.88 <= hits / 200 <= 0.99  # nominal 0.95; the percentile interval is a little short at N = 120


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_boot": 0}, "Expected `n_boot` to be a positive integer, but got 0"),
    ({"level": 1.0}, r"Expected `level` to be a number in \(0, 1\), but got 1"),
    ({"seed": -1}, r"Expected `seed` to be an integer in \[0, 4294967295\], but got -1"),
])
def test_bootstrap_ci_argument_errors(kwargs, message):
    with pytest.raises(MetricArgumentError, match=message):
        bootstrap_ci([0.0, 1.0], **kwargs)
    with pytest.raises(MetricArgumentError, match="Expected `values` to be finite"):
        bootstrap_ci([0.0, float("nan")])
    with pytest.raises(MetricArgumentError, match="Expected `values` to be non-empty"):
        bootstrap_ci([])


# ------------------------------------------------------------------------------------------ pooled
def test_pooled_ci_is_the_direct_two_level_bootstrap():
    values = (np.random.default_rng(2).random((3, 80)) < [[0.5], [0.6], [0.7]]).astype(float)
    got = pooled_bootstrap_ci(ScoreSamples.mean("top1", values), n_boot=500, seed=4)
    assert got == percentile_interval(direct_pooled(values, 500, 4), 0.95)
    one = values[:1]  # one seed: no seed draw, the plain bootstrap of the mean
    assert pooled_bootstrap_ci(ScoreSamples.mean("top1", one), n_boot=300, seed=5) == bootstrap_ci(
        one[0], n_boot=300, seed=5)


def test_pooled_ci_holds_the_seed_spread_when_the_images_have_none():
    # Seed 0 gets every image wrong, seed 1 every image right: resampling images alone would give [0.5, 0.5]; with
    # the seeds resampled a replicate is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1].
    values = np.stack([np.zeros(50), np.ones(50)])
    assert pooled_bootstrap_ci(ScoreSamples.mean("top1", values)) == (0.0, 1.0)
    assert bootstrap_ci(values.mean(axis=0)) == (0.5, 0.5)


def test_pooled_auroc_resamples_id_and_ood_separately():
    rng = np.random.default_rng(0)
    id_c, ood_c = rng.normal(1.0, 1.0, (2, 40)), rng.normal(0.0, 1.0, (2, 30))
    got = pooled_bootstrap_ci(ScoreSamples.auroc("auroc", id_c, ood_c), n_boot=300, seed=1)
    rng = np.random.default_rng(1)
    reps = []
    for _ in range(300):
        i, o, j = rng.integers(0, 40, 40), rng.integers(0, 30, 30), rng.integers(0, 2, 2)
        reps.append(np.mean([roc_auc_score(np.r_[np.zeros(40), np.ones(30)], -np.r_[id_c[s][i], ood_c[s][o]])
                             for s in j]))
    assert got == pytest.approx(percentile_interval(reps, 0.95), abs=1e-12)
    separated = ScoreSamples.auroc("auroc", np.full(10, 0.9), np.full(5, 0.2))
    assert pooled_bootstrap_ci(separated, n_boot=50) == (1.0, 1.0)


def test_pooled_replicates_take_column_b_and_resample_seeds():
    reps = np.random.default_rng(5).random((2, 40))
    rng = np.random.default_rng(9)
    direct = [float(reps[rng.integers(0, 2, 2), b % 40].mean()) for b in range(100)]
    assert pooled_bootstrap_ci(ScoreSamples.replicates("effective_rank", reps), n_boot=100, seed=9) == \
        percentile_interval(direct, 0.95)


# ------------------------------------------------------------------------------------------ paired
def test_paired_ci_is_the_direct_paired_bootstrap():
    rng = np.random.default_rng(6)
    a, b = (rng.random((2, 90)) < 0.7).astype(float), (rng.random((3, 90)) < 0.6).astype(float)
    got = paired_bootstrap_ci(ScoreSamples.mean("top1", a), ScoreSamples.mean("top1", b), n_boot=400, seed=2)
    rng = np.random.default_rng(2)
    diffs = []
    for _ in range(400):
        idx = rng.integers(0, 90, 90)
        ja, jb = rng.integers(0, 2, 2), rng.integers(0, 3, 3)
        diffs.append(np.mean([a[j][idx].mean() for j in ja]) - np.mean([b[j][idx].mean() for j in jb]))
    assert got == pytest.approx(percentile_interval(diffs, 0.95), abs=1e-12)


def test_paired_ci_separates_a_real_difference_and_not_a_tiny_one():
    rng = np.random.default_rng(8)
    strong = (rng.random(300) < 0.8).astype(float)
    weak = strong.copy()
    weak[rng.choice(np.flatnonzero(strong), 45, replace=False)] = 0.0  # 15 points worse by construction
    close = strong.copy()
    close[np.flatnonzero(strong)[:2]] = 0.0  # two images apart
    s = ScoreSamples.mean("top1", strong)
    low, high = paired_bootstrap_ci(ScoreSamples.mean("top1", weak), s)
    assert high < 0 and low == pytest.approx(-0.15, abs=0.05)
    low, high = paired_bootstrap_ci(ScoreSamples.mean("top1", close), s)
    assert low <= 0 <= high
    # paired, only the two differing images move the difference (each drawn a few times at most); an unpaired
    # interval of two accuracies near 80% on 300 images would reach about -6.5 points
    assert -0.03 < low and high == 0.0


def test_paired_ci_refuses_other_test_samples():
    with pytest.raises(MetricArgumentError, match="same kind and sizes"):
        paired_bootstrap_ci(ScoreSamples.mean("top1", np.ones(10)), ScoreSamples.mean("top1", np.ones(11)))
    with pytest.raises(MetricArgumentError, match="describe 'top1'"):
        ScoreSamples.stack([ScoreSamples.mean("top1", np.ones(3)), ScoreSamples.mean("nll", np.ones(3))])


# ------------------------------------------------------------------------------------------ stored form
@pytest.mark.parametrize("kind", ["bits", "float16", "auroc", "replicates"])
def test_stored_samples_round_trip_through_json(tmp_path, kind):
    from prosmin_bench.results import write_record

    rng = np.random.default_rng(0)
    samples = {"bits": ScoreSamples.mean("top1", (rng.random((2, 37)) < 0.5).astype(float)),
               "float16": ScoreSamples.mean("top1", rng.random((2, 37)) * 300),
               "auroc": ScoreSamples.auroc("top1", rng.random((2, 20)), rng.random((2, 9))),
               "replicates": ScoreSamples.replicates("top1", rng.random((2, 15)))}[kind]
    stored = encode(samples, [3, 5])
    rec = ResultRecord(model="m", task="t", task_version=1, task_kind="knn", suite="mini", main_score="top1",
                       weights_sha256="0", seeds=[3, 5], per_seed={"3": {"top1": 0.5}, "5": {"top1": 0.6}},
                       ci95={"top1": [0.4, 0.7]}, samples=stored, ranked=False)
    back = read_record(write_record(rec, tmp_path))
    assert back.samples == stored and back.ci95 == {"top1": [0.4, 0.7]} and back.ranked is False
    got = decode(back.samples, back.seeds)
    for want, have in zip(*(([s.id, s.ood] if s.kind == "auroc" else [s.values]) for s in (samples, got))):
        tol = 2e-3 if kind == "float16" else 1e-6  # float16: 11 significant bits
        np.testing.assert_allclose(have, want, rtol=tol)
    if kind == "bits":
        assert stored["encoding"] == "bits" and len(stored["per_seed"]["3"][0]) == 8  # 37 bits: 5 bytes


# ------------------------------------------------------------------------------------------ every task kind
QUICK_CARDS = """
name = "q_knn"
kind = "knn"
version = 1
suite = "mini"
main_score = "top1_k5"
[datasets]
train = "digits:train"
test = "digits:test"
[protocol]
ks = [5, 10]
---
name = "q_linear"
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
base_lrs = [0.1, 0.3]
---
name = "q_lowshot"
kind = "lowshot"
version = 1
suite = "mini"
main_score = "top1"
[datasets]
train = "digits:train"
test = "digits:test"
[protocol]
fraction = 0.1
lambdas = [0.1]
lambdas_over_n = []
---
name = "q_semisup"
kind = "semisup"
version = 1
suite = "mini"
main_score = "top1"
[datasets]
train = "digits:train"
test = "digits:test"
[protocol]
epochs = 1
batch_size = 64
lr = 1e-3
warmup_epochs = 0
hflip = false
fraction = 0.05
---
name = "q_transfer"
kind = "transfer_finetune"
version = 1
suite = "mini"
main_score = "nll"
[datasets]
train = "lfw:train"
test = "lfw:test"
[protocol]
epochs = 1
batch_size = 64
lr = 1e-3
warmup_epochs = 0
---
name = "q_ood"
kind = "ood"
version = 1
suite = "mini"
main_score = "auroc"
[datasets]
train = "digits:train"
test = "digits:test"
ood = "digits_o:test"
[protocol]
head_task = "q_linear"
---
name = "q_c"
kind = "corruption"
version = 1
suite = "mini"
main_score = "mce"
[datasets]
train = "digits:train"
test = "digits:test"
[protocol]
head_task = "q_linear"
corrupted = "digits_c"
baseline = "pixel_tree"
---
name = "q_collapse"
kind = "collapse"
version = 1
suite = "mini"
ranked = false
main_score = "effective_rank"
[datasets]
data = "digits:test"
"""
KINDS = {"q_knn": "mean", "q_linear": "mean", "q_lowshot": "mean", "q_semisup": "mean", "q_transfer": "mean",
         "q_ood": "auroc", "q_c": "mean", "q_collapse": "replicates"}


@pytest.fixture
def every_kind(tmp_path, shared_home, small_digits_c, monkeypatch):  # noqa: F811
    """Each quick card on random_micro with seeds 0 and 1 (on the first 24 digits test images): the records and
    each seed's TaskOutput. (About 15 s, most of it digits_c's 75 corrupted splits.)"""
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(shared_home))  # train features shared with other test files
    d = tmp_path / "cards"
    d.mkdir()
    for i, text in enumerate(QUICK_CARDS.split("---")):
        (d / f"q{i}.toml").write_text(textwrap.dedent(text))
    cards.add_card_dir(d)
    outputs: dict[str, list] = {}
    real = evaluation.build_task

    def spy(spec):
        task = real(spec)
        run = task.run

        def recording(ctx):
            out = run(ctx)
            outputs.setdefault(spec.name, []).append(out)
            return out

        task.run = recording
        return task

    monkeypatch.setattr(evaluation, "build_task", spy)
    recs = evaluate(["random_micro"], list(KINDS), options=RunOptions(seeds=(0, 1), device="cpu",
                                                                     results_dir=tmp_path / "r"))
    return {r.task: r for r in recs}, outputs


def test_every_kind_gives_samples_that_reproduce_its_main_score(every_kind):
    from prosmin_bench.tasks.collapse import BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED

    records, outputs = every_kind
    for task, kind in KINDS.items():
        rec = records[task]
        assert isinstance(rec, ResultRecord), (task, getattr(rec, "message", ""))
        main = rec.main_score
        for seed, out in zip((0, 1), outputs[task]):
            s = out.samples
            assert (s.metric, s.kind, s.n_seeds) == (main, kind, 1), task
            if kind == "replicates":  # checked against the resampled rows below
                assert s.sizes == (BOOTSTRAP_REPLICATES,)
                continue
            assert s.point()[0] == pytest.approx(out.metrics[main], rel=1e-12, abs=1e-15), (task, seed)
            assert s.point()[0] == pytest.approx(rec.per_seed[str(seed)][main], rel=1e-12, abs=1e-15)
        # the record: the pooled interval and the stored per-image values of both seeds
        low, high = rec.ci95[main]
        assert low <= high and rec.samples["metric"] == main and sorted(rec.samples["per_seed"]) == ["0", "1"]
        stored = decode(rec.samples, rec.seeds).point()
        if kind != "replicates":
            tol = 1e-3 if rec.samples["encoding"] == "float16" else 1e-6
            np.testing.assert_allclose(stored, [rec.per_seed[s][main] for s in ("0", "1")], rtol=tol)
    assert records["q_knn"].samples["encoding"] == "bits" and records["q_c"].samples["encoding"] == "float16"
    assert records["q_collapse"].ranked is False and records["q_knn"].ranked is True
    assert records["q_knn"].model_info["reference"] is False

    # collapse: RankMe of the resampled rows x[rng.integers(0, N, N)], drawn here, the same for every seed
    from prosmin_bench.data import dataset_key, resolve_dataset
    from prosmin_bench.features import cache_key, load_cached
    from prosmin_bench.models import get_model

    ds = resolve_dataset("digits:test")
    fs = load_cached(cache_key(get_model("random_micro"), dataset_key("digits:test"), ds.fingerprint, "cls", "fp32",
                               "float32"))
    x = np.asarray(fs.features, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    direct = [effective_rank(x[rng.integers(0, len(x), len(x))]) for _ in range(5)]
    for out in outputs["q_collapse"]:
        np.testing.assert_allclose(out.samples.values[0, :5], direct, rtol=1e-6)


def _record_dict(**changes) -> dict:
    stored = encode(ScoreSamples.mean("top1", np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])), [0, 1])
    rec = ResultRecord(model="m", task="t", task_version=1, task_kind="knn", suite="mini", main_score="top1",
                       weights_sha256="0", seeds=[0, 1], per_seed={"0": {"top1": 2 / 3}, "1": {"top1": 1 / 3}},
                       ci95={"top1": [0.0, 1.0]}, samples=stored)
    d = rec.to_dict()
    for path, value in changes.items():
        *head, last = path.split(".")
        target = d
        for key in head:
            target = target[key]
        target[last] = value
    return d


@pytest.mark.parametrize(("changes", "message"), [
    ({"ci95": {"top1": [0.9, 0.1]}}, "field 'ci95' holds a list [0.9, 0.1] for 'top1'; expected [low, high]"),
    ({"ci95": {"nll": [0.1, 0.2]}}, "field 'ci95' has an interval for 'nll', which is not one of the record's"),
    ({"samples.metric": "nll"}, "field 'samples' describes a string \"nll\", not the main score 'top1'"),
    ({"samples.encoding": "float16", "samples.kind": "auroc"}, "field 'samples.encoding' must be one of ['float32']"),
    ({"samples.n": [9]}, "field 'samples.per_seed' holds 1 bytes for seed 0; 9 values in bits take 2"),
    ({"samples.n": [3, 3]}, "field 'samples.n' must be 1 positive integer(s) for kind 'mean'"),
    ({"samples.per_seed.1": ["not base64!"]}, "field 'samples.per_seed' holds text that is not base64 for seed 1"),
    ({"samples.per_seed": {"0": ["oA=="]}}, "field 'samples.per_seed' must hold the record's seeds [0, 1]"),
    ({"ranked": "yes"}, "field 'ranked' must be a boolean or null"),
])
def test_record_schema_checks_the_interval_and_the_samples(changes, message):
    from prosmin_bench.record_schema import record_problem

    assert record_problem(_record_dict()) is None
    problem = record_problem(_record_dict(**changes))
    assert problem is not None and problem.startswith(message), problem


def test_record_schema_refuses_non_finite_stored_floats():
    import base64

    from prosmin_bench.record_schema import record_problem

    d = _record_dict()
    d["samples"].update(encoding="float32", per_seed={
        "0": [base64.b64encode(np.array([1.0, np.nan, 0.0], "<f4").tobytes()).decode()],
        "1": [base64.b64encode(np.array([1.0, 0.5, 0.0], "<f4").tobytes()).decode()]})
    assert record_problem(d) == "field 'samples.per_seed' holds a NaN or infinite value for seed 0"


def test_selection_extras_of_every_seed_are_merged():
    from prosmin_bench.evaluation import merge_selections

    seed0 = {"lr": {"grid": [0.1, 0.3, 1.0], "chosen": 0.3, "edge": False}}
    seed1 = {"lr": {"grid": [0.1, 0.3, 1.0, 3.0], "chosen": 3.0, "edge": True},
             "lambda": {"grid": [0.01], "chosen": 0.01, "edge": True}}
    assert merge_selections([seed0, seed1, None]) == {
        "lambda": {"grid": [0.01], "chosen": [None, 0.01, None], "edge": [None, True, None]},
        "lr": {"grid": [0.1, 0.3, 1.0, 3.0], "chosen": [0.3, 3.0, None], "edge": [False, True, None]},
    }
